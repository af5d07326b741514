"""The command line: configs by name or path, ml_collections-style flags, the key listing."""

from sse_sam_jax import cli
from sse_sam_jax.train import config as config_lib


def test_config_by_name_and_by_path_are_the_same():
  by_name = cli.load_config('cifar10_lt_ssesam', [])
  from sse_sam_jax import configs
  import pathlib
  by_path = cli.load_config(str(pathlib.Path(configs.__file__).with_name('cifar10_lt_ssesam.py')), [])
  assert by_name.to_dict() == by_path.to_dict()
  assert by_name.data.name == 'cifar10' and by_name.optimizer.eta == 1000.0
  assert 'cifar100_lt_ssesam' in configs.NAMES and 'mnist1d_lt' in configs.NAMES


def test_ml_collections_flags_equal_key_value_overrides(capsys):
  assert cli.main(['config', '--config=mnist1d_lt', '--config.optimizer.lr=0.2',
                   '--config.epochs', '3', 'seed=4']) == 0
  listed = dict(line.split(' = ', 1) for line in capsys.readouterr().out.splitlines())
  assert listed['optimizer.lr'] == '0.2' and listed['epochs'] == '3' and listed['seed'] == '4'
  # every key of the config is listed with its value
  assert set(listed) == set(cli._flat_keys(config_lib.default_config()))  # pylint: disable=protected-access


def test_unknown_config_name_suggests_the_nearest(capsys):
  assert cli.main(['config', '--config', 'cifar100_lt_sesam']) == 2
  err = capsys.readouterr().err
  assert "no config named 'cifar100_lt_sesam'" in err and "did you mean 'cifar100_lt_ssesam'" in err
