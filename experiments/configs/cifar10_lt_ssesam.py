"""CIFAR-10-LT IF 100 with the SSE-SAM reference recipe (eta 1000: classes under 1000 are tail)."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    'c100', pathlib.Path(__file__).with_name('cifar100_lt_ssesam.py'))
_c100 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_c100)


def get_config():
  c = _c100.get_config()
  c.data.name = 'cifar10'
  c.data.shots = 'cifar10'
  c.optimizer.eta = 1000.0
  return c
