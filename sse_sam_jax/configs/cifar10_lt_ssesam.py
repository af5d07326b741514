"""CIFAR-10-LT IF 100 with the SSE-SAM reference recipe (eta 1000: classes under 1000 are tail)."""

import importlib.util
import pathlib


def _base_config():
  """The CIFAR-100-LT recipe, loaded from its file beside this one (configs import configs)."""
  path = pathlib.Path(__file__).with_name('cifar100_lt_ssesam.py')
  spec = importlib.util.spec_from_file_location('cifar100_lt_ssesam', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _base_config()
  c.data.name = 'cifar10'
  c.data.shots = 'cifar10'
  c.optimizer.eta = 1000.0
  return c
