"""The command line: configs by name or path, ml_collections-style flags, the key listing."""

import pathlib
import subprocess
import sys

from sse_sam_jax import cli
from sse_sam_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_config_by_name_and_by_path_are_the_same():
  by_name = cli.load_config('cifar10_lt_ssesam', [])
  import pathlib

  from sse_sam_jax import configs
  path = pathlib.Path(configs.__file__).with_name('cifar10_lt_ssesam.py')
  by_path = cli.load_config(str(path), [])
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


def test_a_tfds_config_without_tensorflow_datasets_names_the_extra(tmp_path):
  """TFDS is the [tfds] extra: without it a TFDS config fails in one line that names it."""
  code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"
          "from sse_sam_jax.cli import main\n"
          f"sys.exit(main(['train', '--config', 'cifar100_lt_ssesam', '--workdir', "
          f"{str(tmp_path / 'run')!r}, '--no-progress']))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install 'sse-sam-jax[tfds]'" in lines[0], out.stderr
