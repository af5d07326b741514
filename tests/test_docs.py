"""The documentation's generated parts stay complete without building it: every config key
has a meaning, and every public name an API entry (the build checks both too)."""

import importlib
import importlib.util
import pathlib

from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import config_keys

DOCS = pathlib.Path(__file__).resolve().parents[1] / 'docs'


def _conf():
  spec = importlib.util.spec_from_file_location('docs_conf', DOCS / 'conf.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_key_has_a_meaning_and_the_table_lists_it():
  keys = config_keys.flat_keys(config_lib.default_config())
  table = config_keys.reference_table()
  assert set(keys) == set(config_keys.MEANINGS)
  for key in keys:
    assert f'| `{key}` |' in table


def test_a_key_without_a_meaning_fails_the_table(monkeypatch):
  monkeypatch.delitem(config_keys.MEANINGS, 'seed')
  try:
    config_keys.reference_table()
  except KeyError as e:
    assert "'seed'" in str(e)
  else:
    raise AssertionError('a key without a meaning passed')


def test_every_public_name_has_an_api_entry():
  conf = _conf()
  documented = conf.documented_names((DOCS / 'api.md').read_text())
  for module_name in conf.PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    for name in module.__all__:
      if name not in conf.NOT_DOCUMENTED:
        assert f'{module_name}.{name}' in documented, f'{module_name}.{name}'
        assert hasattr(module, name), f'{module_name}.{name} in __all__ but not defined'
