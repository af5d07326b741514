"""Compile cost of the paper's recipe: what each training program costs to build, and why.

Builds the programs the trainer builds for the CIFAR-100-LT recipe (ResNet-34 with the
CIFAR stem, batch 64, SSE-SAM across its switch, ``--config cifar100_lt_ssesam``) on
CIFAR-shaped data of the real sizes (``full_recipe.make_data``), one after the other on
one thread, and times each one's two parts:

  * trace + lower: Python tracing of the step (the model's passes, the optimizer) to
    StableHLO; the same on every backend, paid again by every process that does not
    load the program from the executable cache;
  * XLA compile: optimisation and code generation (on a GPU also the autotuning of
    convolutions and matmuls, ``xla_gpu_autotune_level``).

with the size of each program (StableHLO ops, and the convolutions in it). JAX's
persistent compilation cache is off, so every compile is cold. ``--xla NAME=VALUE``
(repeatable) passes XLA options to every compile (e.g. ``--xla xla_gpu_autotune_level=0``)
and ``--steps-per-dispatch`` overrides the dispatch grouping (0: the trainer's default:
8 on accelerators, 1 on CPUs). The evaluation program is timed too.

  python benchmarks/compile_cost.py [--precision float32] [--xla NAME=VALUE ...]

prints one line per program and ``compile cost: <total> s (<lower> s trace + lower,
<compile> s XLA; <n> programs, <device>)``; writes ``benchmarks/results/
compile_cost_<device>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))


def _value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(text.lower(), text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--precision', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--steps-per-dispatch', type=int, default=0)
  parser.add_argument('--xla', action='append', default=[], metavar='NAME=VALUE')
  parser.add_argument('--scale', type=float, default=1.0,
                      help='fraction of every class kept (the program shapes do not change)')
  parser.add_argument('--model', default='resnet34_cifar')
  parser.add_argument('--time-steps', type=int, default=0,
                      help='then run the first program this many times: ms per step (an '
                           'XLA option that compiles faster may run slower)')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)
  import full_recipe  # pylint: disable=g-import-not-at-top

  from sse_sam_jax.configs import cifar100_lt_ssesam  # pylint: disable=g-import-not-at-top
  from sse_sam_jax.train import dispatch, evaluate, setup  # pylint: disable=g-import-not-at-top
  from sse_sam_jax.train.compiled_step import (  # pylint: disable=g-import-not-at-top
    CompiledTrainStep,
    compiler_options,
  )

  options = dict(compiler_options('eigen'))
  for item in args.xla:
    name, _, value = item.partition('=')
    options[name] = _value(value)
  c = cifar100_lt_ssesam.get_config()
  per_class = max(10, int(round(625 * args.scale)))
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='compile_cost_'))
  c.data.update(name='npz', npz_path=str(full_recipe.make_data(tmp / 'c.npz', per_class)))
  c.model.name, c.model.compute_dtype = args.model, args.precision
  c.steps_per_dispatch = args.steps_per_dispatch
  c.compilation_cache_dir = ''
  run = setup.prepare(c)
  step = CompiledTrainStep(run.model, run.tx, run.loss, run.class_groups,
                           boundaries=run.boundaries, state_sharding=run.state_sharding,
                           batch_sharding=run.batch_sharding,
                           sharpness_step_at=run.sharpness_step_at,
                           running_stats=run.running_stats, compiler_options=options)
  total = c.epochs * run.steps_per_epoch
  plan = dispatch.plan(c, run)
  needed = dispatch.programs(run, plan.dispatches(0, total), step)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                       run.state)
  rows, first = [], None
  for (stage, kind), batch in needed:
    steps = batch['label'].shape[0] if batch['label'].ndim == 2 else 1
    t0 = time.perf_counter()
    lowered = step._jit((stage, kind), steps).lower(state, batch)  # pylint: disable=protected-access
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options or None)
    t2 = time.perf_counter()
    first = first or (compiled, batch)
    text = lowered.as_text()
    rows.append(dict(program=f'stage {stage}, {steps} step(s), batch {batch["label"].shape}',
                     lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
                     stablehlo_ops=len(re.findall(r'^\s*(?:%\S+ = )?"?stablehlo\.', text,
                                                  re.M)),
                     convolutions=text.count('stablehlo.convolution')))
    print(f"{rows[-1]['program']}: trace + lower {rows[-1]['lower_s']} s, XLA "
          f"{rows[-1]['compile_s']} s, {rows[-1]['stablehlo_ops']} ops, "
          f"{rows[-1]['convolutions']} convolutions", flush=True)
  t0 = time.perf_counter()
  predict = evaluate.make_predict(run.model, c.eval.flip_tta)
  x = jax.ShapeDtypeStruct((c.eval.batch_size,) + run.data.test.x.shape[1:], run.input_dtype)
  lowered = predict.lower(state.params, state.batch_stats, x)
  t1 = time.perf_counter()
  lowered.compile(compiler_options=options or None)
  eval_row = dict(program=f'evaluation, batch {c.eval.batch_size}', lower_s=round(t1 - t0, 2),
                  compile_s=round(time.perf_counter() - t1, 2))
  print(f"{eval_row['program']}: trace + lower {eval_row['lower_s']} s, XLA "
        f"{eval_row['compile_s']} s", flush=True)
  ms_per_step = None
  if args.time_steps and first is not None:
    import numpy as np  # pylint: disable=g-import-not-at-top
    compiled, spec = first
    batch = {k: jax.device_put(np.ones(v.shape, v.dtype) if k == 'mask' else
                               np.zeros(v.shape, v.dtype), v.sharding) for k, v in spec.items()}
    steps = spec['label'].shape[0] if spec['label'].ndim == 2 else 1
    train_state = run.state
    for _ in range(2):  # warm-up
      train_state, metrics = compiled(train_state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.time_steps):
      train_state, metrics = compiled(train_state, batch)
    jax.block_until_ready(metrics)
    ms_per_step = round(1e3 * (time.perf_counter() - t0) / (args.time_steps * steps), 3)
    print(f'first program: {ms_per_step} ms per step', flush=True)
  device = jax.devices()[0].device_kind.replace(' ', '_')
  lower_s = sum(r['lower_s'] for r in rows)
  compile_s = sum(r['compile_s'] for r in rows)
  line = (f'compile cost: {lower_s + compile_s:.1f} s ({lower_s:.1f} s trace + lower, '
          f'{compile_s:.1f} s XLA; {len(rows)} train programs, {args.precision}, {device}'
          + (f', {" ".join(args.xla)}' if args.xla else '') + ')')
  out = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
             precision=args.precision, model=args.model, scale=args.scale, xla_options=options,
             steps_per_dispatch=plan.k, programs=rows,
             evaluation=eval_row, train_lower_s=round(lower_s, 2),
             train_compile_s=round(compile_s, 2), ms_per_step=ms_per_step, line=line)
  path = pathlib.Path(args.out or ROOT / 'benchmarks' / 'results' / f'compile_cost_{device}.json')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(line)


if __name__ == '__main__':
  main()
