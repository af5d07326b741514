"""CIFAR-10-LT IF 100 with the SSE-SAM reference recipe (eta 1000: classes under 1000 are tail)."""

import pathlib

from sse_sam_jax.cli import load_config

_BASE = pathlib.Path(__file__).with_name('cifar100_lt_ssesam.py')


def get_config():
  c = load_config(str(_BASE), [])
  c.data.name = 'cifar10'
  c.data.shots = 'cifar10'
  c.optimizer.eta = 1000.0
  return c
