"""Command line: ``sse-sam-jax train|eval|hessian [--config FILE] [--workdir DIR] [key=value ...]``.

``--config`` is a Python file with ``get_config()`` returning an
``ml_collections.ConfigDict`` (see ``experiments/configs/``); without it, the
offline long-tailed benchmark. Overrides are dotted keys:
``optimizer.name=sam optimizer.rho=0.1 epochs=10``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import pathlib
import sys

try:
  from sse_sam_jax.train import config as config_lib
except ModuleNotFoundError as missing:  # a core-only install: jax + optax
  config_lib = None
  _MISSING_MODULE = missing.name


def _require_training_extra():
  if config_lib is None:
    raise SystemExit(
        f"sse-sam-jax: the training system needs the [train] extra (missing module "
        f"{_MISSING_MODULE!r}); install it with: pip install 'sse-sam-jax[train]' "
        "(Python >= 3.12). The optimizers alone need only jax and optax.")


def load_config(path: str | None, overrides: list[str]):
  if path:
    spec = importlib.util.spec_from_file_location('user_config', path)
    if spec is None or not pathlib.Path(path).exists():
      raise SystemExit(f'config file {path} not found')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
  else:
    c = config_lib.default_config()
  for item in overrides:
    key, sep, raw = item.partition('=')
    if not sep:
      raise SystemExit(f'override {item!r} is not key=value')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise SystemExit(f'unknown config key {key!r}')
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int):
      value = float(value)
    node[leaf] = value
  return c


def main(argv=None):
  parser = argparse.ArgumentParser(prog='sse-sam-jax', description=__doc__.splitlines()[0])
  parser.add_argument('command', choices=('train', 'eval', 'hessian'))
  parser.add_argument('--config', default=None)
  parser.add_argument('--workdir', default='runs/default')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--distributed', action='store_true',
                      help='call jax.distributed.initialize() first (multi-host)')
  parser.add_argument('--groups', default='head_tail', choices=('head_tail', 'shots', 'class'),
                      help='hessian: the class groups')
  parser.add_argument('--split', default='train', choices=('train', 'val', 'test'))
  parser.add_argument('--lanczos-iters', type=int, default=40)
  parser.add_argument('--trace-probes', type=int, default=20)
  parser.add_argument('--max-examples', type=int, default=4096)
  parser.add_argument('overrides', nargs='*', help='dotted key=value config overrides')
  args = parser.parse_intermixed_args(argv)
  _require_training_extra()
  c = load_config(args.config, args.overrides)
  try:
    config_lib.validate(c)
  except ValueError as e:
    raise SystemExit(str(e))
  if args.distributed:
    import jax
    jax.distributed.initialize()  # TPU VM pods / multi-host GPU: reads the cluster env
  from sse_sam_jax.train import trainer
  if args.command == 'train':
    result = trainer.train(c, args.workdir, progress=not args.no_progress)
  elif args.command == 'eval':
    result = trainer.evaluate_checkpoint(c, args.workdir)
  else:
    result = trainer.hessian_of_checkpoint(
        c, args.workdir, groups=args.groups, split=args.split, lanczos_iters=args.lanczos_iters,
        trace_probes=args.trace_probes, max_examples=args.max_examples)
    print(result['table'])
    print(f"spectra: {result['path']}")
    return 0
  print(result['table'])
  if args.command == 'train':
    print(f"results: {pathlib.Path(args.workdir) / 'results.json'}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
