"""Command line: ``sse-sam-jax train|eval|hessian [--config FILE] [--workdir DIR] [key=value ...]``.

``--config`` is a Python file with ``get_config()`` returning an
``ml_collections.ConfigDict``, or the name of a shipped one (``sse_sam_jax/configs/``);
without it, the offline long-tailed benchmark. Overrides are dotted keys:
``optimizer.name=sam optimizer.rho=0.1 epochs=10``.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import pathlib
import sys

try:
  from sse_sam_jax.train import config as config_lib
except ModuleNotFoundError as missing:  # a core-only install: jax + optax
  config_lib = None
  _MISSING_MODULE = missing.name


def _require_training_extra():
  if config_lib is None and sys.version_info < (3, 12):
    raise SystemExit(
        f'sse-sam-jax: the training system needs Python >= 3.12 (flax 0.12 does); this is '
        f'Python {sys.version_info.major}.{sys.version_info.minor}, where the [train] extra '
        'installs nothing. The optimizers (import sse_sam_jax) work here.')
  if config_lib is None:
    raise SystemExit(
        f"sse-sam-jax: the training system needs the [train] extra (missing module "
        f"{_MISSING_MODULE!r}); install it with: pip install 'sse-sam-jax[train]' "
        "(Python >= 3.12). The optimizers alone need only jax and optax.")


class _ConfigError(ValueError):
  pass


def _flat_keys(c, prefix=''):
  keys = []
  for k, v in c.items():
    keys += _flat_keys(v, f'{prefix}{k}.') if hasattr(v, 'items') else [f'{prefix}{k}']
  return keys


def _unknown_key(key, c):
  keys = _flat_keys(c)
  leaf = key.rsplit('.', 1)[-1]
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or [
      k for k in keys if k.rsplit('.', 1)[-1] == leaf][:1]
  hint = f"; did you mean {close[0]!r}?" if close else '; `sse-sam-jax config` lists every key.'
  return _ConfigError(f'unknown config key {key!r}{hint}')


def _typed(key, old, value, raw):
  """``value`` (parsed from ``raw``) in the type of the default ``old``; one-line errors."""
  if isinstance(old, bool):
    if isinstance(value, bool):
      return value
    raise _ConfigError(f'{key} must be True or False, got {raw!r}.')
  if isinstance(old, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, int) and isinstance(value, int) and not isinstance(value, bool):
    return value
  if isinstance(old, int) and isinstance(value, float) and value == int(value):
    return int(value)
  if isinstance(old, str):
    return raw if not isinstance(value, str) else value
  if isinstance(old, (int, float)):
    kind = 'an integer' if isinstance(old, int) else 'a number'
    raise _ConfigError(f'{key} must be {kind}, got {raw!r}.')
  return value


def load_config(path: str | None, overrides: list[str], base=None):
  """The config of ``path`` (a Python file with ``get_config()``), else ``base``, else the
  default, with dotted ``key=value`` overrides applied; a mistake is a one-line
  ``ValueError``."""
  if path:
    file = pathlib.Path(path)
    if not file.suffix and not file.exists():  # a shipped config, by name
      from sse_sam_jax import configs  # pylint: disable=g-import-not-at-top
      if path not in configs.NAMES:
        close = difflib.get_close_matches(path, configs.NAMES, n=1)
        raise _ConfigError(f'no config named {path!r}; shipped: {", ".join(configs.NAMES)}'
                           + (f' (did you mean {close[0]!r}?)' if close else '') + '.')
      file = pathlib.Path(configs.__file__).with_name(f'{path}.py')
    if not file.is_file():
      raise _ConfigError(f'config file {path} not found.')
    if file.suffix != '.py':
      raise _ConfigError(f'config file {path} is not a Python file (.py) with get_config().')
    spec = importlib.util.spec_from_file_location(f'user_config_{file.stem}', file)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # pylint: disable=broad-except  (the user's file: any error)
      where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
      raise _ConfigError(f'config file {path} could not be loaded{where}: '
                         f'{type(e).__name__}: {e}') from None
    if not hasattr(module, 'get_config'):
      raise _ConfigError(f'config file {path} has no get_config() function.')
    c = module.get_config()
  else:
    c = config_lib.default_config() if base is None else base
  for item in overrides:
    key, sep, raw = item.partition('=')
    if not sep:
      raise _ConfigError(f'override {item!r} is not key=value.')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      if not hasattr(node, 'items') or p not in node:
        raise _unknown_key(key, c)
      node = node[p]
    if not hasattr(node, 'items') or leaf not in node or hasattr(node[leaf], 'items'):
      raise _unknown_key(key, c)
    node[leaf] = _typed(key, node[leaf], value, raw)
  return c


# What a user's mistake raises: reported in one line on stderr, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
               FileExistsError, FloatingPointError, RuntimeError, KeyError)


def _split_config_flags(argv):
  """ml_collections' flag style: ``--config.a.b=v`` / ``--config.a.b v`` -> ``a.b=v``."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key, sep, value = arg[len('--config.'):].partition('=')
      if not sep:
        if i + 1 >= len(argv):
          raise _ConfigError(f'{arg} needs a value.')
        value, i = argv[i + 1], i + 1
      overrides.append(f'{key}={value}')
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def describe_config(c) -> str:
  """Every key of ``c`` with its value, one per line."""
  return '\n'.join(f'{k} = {v!r}' for k, v in sorted(
      (k, _get(c, k)) for k in _flat_keys(c)))


def _get(c, key):
  for part in key.split('.'):
    c = c[part]
  return c


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv, flag_overrides = _split_config_flags(argv)
  except _ConfigError as e:
    print(f'sse-sam-jax: error: {e}', file=sys.stderr)
    return 2
  parser = argparse.ArgumentParser(
      prog='sse-sam-jax', description=__doc__.splitlines()[0],
      epilog='Overrides: key=value or --config.key=value; `sse-sam-jax config [--config X]` '
             'lists every key with its value.')
  parser.add_argument('command', nargs='?', choices=('train', 'eval', 'hessian', 'config'),
                      help='train, eval, hessian, or config (lists every key)')
  parser.add_argument('--config', default=None,
                      help='a shipped config by name (e.g. cifar100_lt_ssesam) or a .py path')
  parser.add_argument('--workdir', default='runs/default',
                      help='where the run lives (default: %(default)s)')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--restart', action='store_true',
                      help='train: move an existing run in --workdir aside and start fresh')
  parser.add_argument('--debug', action='store_true',
                      help='show the full traceback of an error')
  parser.add_argument('--distributed', action='store_true',
                      help='call jax.distributed.initialize() first (multi-host)')
  parser.add_argument('--verbosity', default='info', choices=('debug', 'info', 'warning', 'error'),
                      help='which messages to show (the results table is always printed)')
  parser.add_argument('--log-all-hosts', action='store_true',
                      help='multi-host: every host logs (default: the first host only)')
  parser.add_argument('--groups', default='head_tail', choices=('head_tail', 'shots', 'class'),
                      help='hessian: the class groups')
  parser.add_argument('--split', default='train', choices=('train', 'val', 'test'))
  parser.add_argument('--lanczos-iters', type=int, default=40)
  parser.add_argument('--trace-probes', type=int, default=20)
  parser.add_argument('--max-examples', type=int, default=4096)
  parser.add_argument('overrides', nargs='*', help='dotted key=value config overrides')
  args = parser.parse_intermixed_args(argv)
  if args.command is None:
    print('sse-sam-jax: error: name a command: train, eval, hessian or config, e.g. '
          '`sse-sam-jax train --workdir runs/mnist1d_lt` (--help lists the options).',
          file=sys.stderr)
    return 2
  args.overrides = list(args.overrides) + flag_overrides
  _require_training_extra()
  from sse_sam_jax.train import logs  # pylint: disable=g-import-not-at-top
  logs.setup(args.verbosity, all_hosts=args.log_all_hosts)
  try:
    return _run(args)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop: stop at once
    if args.debug:
      raise
    print('sse-sam-jax: interrupted; nothing was saved since the last checkpoint.',
          file=sys.stderr)
    return 128 + 2
  except USER_ERRORS as e:
    if args.debug:
      raise
    message = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError):
      message = f'missing key {message}'
    print(f'sse-sam-jax: error: {message} (--debug shows the traceback)', file=sys.stderr)
    return 2


def _saved_config(args):
  """``eval`` and ``hessian`` without ``--config``: the config the workdir trained with
  (its ``config.json``), so that the training overrides need not be repeated."""
  if args.command not in ('eval', 'hessian') or args.config is not None:
    return None
  from sse_sam_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  saved = workdir_lib.as_path(args.workdir) / workdir_lib.CONFIG_FILE
  if not saved.is_file():
    return None
  try:
    return config_lib.from_saved(json.loads(saved.read_text()))
  except json.JSONDecodeError as e:
    raise _ConfigError(f'{saved} is not valid JSON ({e}); pass --config and the overrides '
                       'the run trained with.') from None


def _run(args):
  c = load_config(args.config, args.overrides, base=_saved_config(args))
  config_lib.validate(c)
  if args.command == 'config':
    print(describe_config(c))
    return 0
  if args.distributed:
    import jax
    jax.distributed.initialize()  # TPU VM pods / multi-host GPU: reads the cluster env
  from sse_sam_jax.train import commands, trainer
  if args.command == 'train':
    result = trainer.train(c, args.workdir, progress=not args.no_progress, restart=args.restart)
    if result.get('preempted'):
      return 128 + 15  # stopped by SIGTERM, checkpoint saved: the rerun resumes
    if result.get('interrupted'):
      return 128 + 2  # stopped by Ctrl-C, checkpoint saved: the rerun resumes
  elif args.command == 'eval':
    result = commands.evaluate_checkpoint(c, args.workdir)
  else:
    result = commands.hessian_of_checkpoint(
        c, args.workdir, groups=args.groups, split=args.split, lanczos_iters=args.lanczos_iters,
        trace_probes=args.trace_probes, max_examples=args.max_examples,
        progress=not args.no_progress)
    print(result['table'])
    print(f"spectra: {result['path']}")
    return 0
  print(result['table'])
  if args.command == 'train':
    if result.get('throughput'):
      print(result['throughput'])
    print(f"results: {pathlib.Path(args.workdir) / 'results.json'}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
