"""The executable cache's key covers everything a compiled train step is built from: a
generative guard over every config key (a key added later is covered unless declared
neutral) and every data-derived input, so a rerun can never load another run's program."""

import types

import numpy as np
import pytest

from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import trainer
from sse_sam_jax.train import workdir as workdir_lib
from sse_sam_jax.train.config_keys import flat_keys
from sse_sam_jax.train.executable_cache import ExecutableCache


class _Train:
  """A training split's shape: what the program fingerprint reads of it."""

  def __init__(self, x):
    self.x = x

  def __len__(self):
    return len(self.x)


def _run(counts=(50, 20, 5), examples=75, shape=(40,), dtype=np.float32):
  x = np.zeros((examples,) + tuple(shape), dtype)
  return types.SimpleNamespace(stats=types.SimpleNamespace(counts=np.asarray(counts)),
                               data=types.SimpleNamespace(train=_Train(x)))


def _key(c, run=None, tmp_path=None):
  fingerprint = trainer.program_fingerprint(c, run or _run())
  return ExecutableCache(tmp_path, fingerprint)._base  # pylint: disable=protected-access


def _changed(value):
  """Another value of the same type."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 1
  if isinstance(value, str):
    return value + '_other'
  if isinstance(value, tuple):
    return value + value[-1:]
  raise TypeError(value)


KEYS = sorted(flat_keys(config_lib.default_config()))


@pytest.mark.parametrize('key', KEYS)
def test_every_key_that_alters_training_changes_the_program_key(key, tmp_path):
  base = config_lib.default_config()
  other = config_lib.default_config()
  *parents, leaf = key.split('.')
  node = other
  for p in parents:
    node = node[p]
  node[leaf] = _changed(node[leaf])
  same = _key(base, tmp_path=tmp_path) == _key(other, tmp_path=tmp_path)
  # a neutral key (workdir.NEUTRAL_KEYS: logging, evaluation, workers, devices...) may
  # change on a resume and must not invalidate the programs; any other must
  assert same == workdir_lib.is_neutral(key), key


@pytest.mark.parametrize('data', [dict(counts=(50, 20, 6)), dict(counts=(50, 20, 5, 1)),
                                  dict(examples=76), dict(shape=(41,)), dict(shape=(40, 1)),
                                  dict(dtype=np.uint8)])
def test_every_data_derived_input_changes_the_program_key(data, tmp_path):
  c = config_lib.default_config()
  assert _key(c, _run(**data), tmp_path) != _key(c, _run(), tmp_path)
  assert _key(c, _run(), tmp_path) == _key(c, _run(), tmp_path)
