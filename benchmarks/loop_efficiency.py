"""Loop efficiency: the real trainer's examples/s over the bare compiled step's, same run.

For each run the trainer (``sse_sam_jax.train.trainer.train``) trains from its
config in a fresh workdir; then, in the same process, the run's own
``CompiledTrainStep`` (same model, batch, method, sharding) is called back to back
on one device-resident batch for as many steps as the trainer ran, crossing the
stage switch at the same step, with no host work in between and one wait at the
end: what the loop would reach if it cost nothing (``benchmarks/step_cost.py``'s
measurement, pipelined).

  efficiency = trainer examples/s / bare-step examples/s

The trainer's examples/s is the steady state: the ``metrics.jsonl`` intervals
after the first (which holds the first steps' warm-up), evaluation and
checkpoint time excluded (the trainer's log lines exclude them). The
end-to-end figure (every second of the loop, evaluation and checkpoints
included) is printed too.

Runs:
  main:    the README main job (MNIST-1D-LT, 1D CNN, SSE-SAM, 40 epochs, batch 128);
  resnet:  ResNet-32 (``--resnet-model``), batch 128, on a CIFAR-shaped ``.npz``
           (32x32x3, 10 classes, long-tailed) with pad-crop-flip augmentation and
           evaluation after every epoch.

  python benchmarks/loop_efficiency.py [--runs main,resnet] [--resnet-epochs 3]
      [--resnet-model resnet32] [--resnet-batch 128] [--resnet-examples 1280]
      [--out benchmarks/results/loop_efficiency.json]

The last printed line is ``loop efficiency: <min over runs>``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np

from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import dispatch, setup, trainer
from sse_sam_jax.train.compiled_step import CompiledTrainStep, compiler_options


def main_job_config():
  return config_lib.default_config()  # the README main job


def resnet_config(npz: pathlib.Path, args):
  c = config_lib.default_config()
  c.epochs = args.resnet_epochs
  c.data.name, c.data.npz_path, c.data.imbalance_factor = 'npz', str(npz), 1.0
  c.data.batch_size, c.data.augment, c.data.shots = args.resnet_batch, True, 'default'
  c.data.num_workers, c.data.augment_on = args.num_workers, args.augment_on
  c.model.name = args.resnet_model
  c.optimizer.eta = float(np.sort(_counts(args.resnet_examples))[5])  # 5 tail classes
  c.optimizer.lr = 0.1
  c.eval.every_epochs = 1
  c.eval.batch_size = 500
  c.checkpoint.every_epochs = 1
  c.log_every_steps = 5
  return c


def _counts(n: int) -> np.ndarray:
  """CIFAR-10-LT's class profile (IF 100) scaled to ``n`` training examples."""
  counts = 100.0 ** (-np.arange(10) / 9)
  return np.maximum(np.round(counts / counts.sum() * n), 2).astype(int)


def make_cifar_shaped_npz(path: pathlib.Path, n_train: int, seed=0) -> pathlib.Path:
  """Standardised 32x32x3 float images, 10 long-tailed classes (+ a held-out 20%)."""
  rng = np.random.default_rng(seed)
  counts = _counts(n_train)
  y = np.repeat(np.arange(10), np.round(counts * 1.25).astype(int))  # 20% held out as test
  x = rng.normal(size=(len(y), 32, 32, 3)).astype(np.float32)
  x += np.linspace(-1, 1, 10)[y, None, None, None].astype(np.float32)  # learnable
  np.savez(path, x=x, y=y)
  return path


def steady_state(workdir: pathlib.Path) -> dict:
  """Examples/s over the log intervals after the first (eval and checkpoints excluded)."""
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  lines = [l for l in lines if 'step_s' in l]
  examples = seconds = 0.0
  for prev, cur in zip(lines, lines[1:]):
    interval = cur['step_s'] * (cur['step'] - prev['step'])
    seconds += interval
    examples += cur['examples_per_s'] * interval
  return {'examples_per_s': examples / seconds, 'seconds': seconds,
          'steps': lines[-1]['step'] - lines[0]['step'],
          'data_wait_frac': float(np.mean([l['data_wait_frac'] for l in lines[1:]]))}


def resident_step(c):
  """``(run, step, batch)``: the run's compiled step as the trainer builds it and one
  resident full batch (with the trainer's mask where the run pads its last batch)."""
  run = setup.prepare(c)
  step_fn = CompiledTrainStep(
      run.model, run.tx, run.loss, run.class_groups, boundaries=run.boundaries,
      state_sharding=run.state_sharding, batch_sharding=run.batch_sharding,
      per_device_axis=run.scope.per_device_axis, microbatch=run.scope.microbatch,
      compiler_options=compiler_options(c.cpu_convolutions))
  b = run.spec.batch_size
  batch = {'x': np.asarray(run.data.train.x[:b], np.float32),
           'label': np.asarray(run.data.train.label[:b], np.int32)}
  if run.pads_last_batch:  # the trainer's program: every batch has a mask
    batch['mask'] = np.ones(b, np.bool_)
  return run, step_fn, jax.device_put(batch, run.batch_sharding)


def bare_step(c, steps: int, first_step: int) -> dict:
  """The run's compiled step called back to back on one resident batch (no loop work)."""
  run, step_fn, batch = resident_step(c)
  b, state = run.spec.batch_size, run.state
  for i in range(first_step):  # warm (and compile) the stages at the trainer's first steps
    state, m = step_fn(state, batch, i)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(first_step, first_step + steps):
    state, m = step_fn(state, batch, i)
  jax.block_until_ready((state, m))
  seconds = time.perf_counter() - t0
  return {'examples_per_s': steps * b / seconds, 'seconds': seconds, 'steps': steps}


def measure(name: str, c, root: pathlib.Path) -> dict:
  workdir = root / name
  # The bare step runs the trainer's steady-state steps (the steps after its first log
  # line: the same stages), once before the trainer and once after: the machine's speed
  # drifts (on the 2-core VM, +-15% between runs), and the two bracket the trainer.
  run = setup.prepare(c)
  total = c.epochs * run.steps_per_epoch
  plan = dispatch.plan(c, run)
  first_logged = min([s + n for s, n in plan.dispatches(0, total) if s + n >= c.log_every_steps]
                     + [run.steps_per_epoch])  # an epoch's end closes an interval too
  steady_steps = total - first_logged
  del run
  bares = [bare_step(c, steady_steps, first_logged)]
  t0 = time.perf_counter()
  result = trainer.train(c, workdir, progress=False)
  wall = time.perf_counter() - t0
  loop = steady_state(workdir)
  assert loop['steps'] == steady_steps, (loop['steps'], steady_steps)
  bares.append(bare_step(c, steady_steps, first_logged))
  bare = {'examples_per_s': float(np.mean([b['examples_per_s'] for b in bares]))}
  timing = result['timing']
  end_to_end = timing['examples'] / timing['loop_s']
  out = dict(
      wall_s=round(wall, 2), compile_s=timing['compile_s'], loop_s=timing['loop_s'],
      eval_s=timing['eval_s'], checkpoint_s=timing['checkpoint_s'],
      steps=timing['steps'], trainer_examples_per_s=round(loop['examples_per_s'], 1),
      bare_examples_per_s=round(bare['examples_per_s'], 1),
      bare_runs_examples_per_s=[round(b['examples_per_s'], 1) for b in bares],
      efficiency=round(loop['examples_per_s'] / bare['examples_per_s'], 3),
      end_to_end_examples_per_s=round(end_to_end, 1),
      end_to_end_efficiency=round(end_to_end / bare['examples_per_s'], 3),
      data_wait_frac=round(loop['data_wait_frac'], 3),
      test_all=round(100 * result['test']['all'], 2))
  print(f"{name}: trainer {out['trainer_examples_per_s']:.0f} ex/s (steady), bare step "
        f"{out['bare_examples_per_s']:.0f} ex/s -> efficiency {out['efficiency']:.3f}; "
        f"end to end (eval {out['eval_s']:.1f}s, checkpoints {out['checkpoint_s']:.1f}s "
        f"included) {out['end_to_end_efficiency']:.3f}; wall {out['wall_s']:.1f}s "
        f"(compile {out['compile_s']:.1f}s)", flush=True)
  return out


def run_config(name: str, args, root: pathlib.Path):
  """The config of run ``main`` or ``resnet`` (its ``.npz`` written under ``root``)."""
  if name == 'main':
    return main_job_config()
  if name == 'resnet':
    return resnet_config(make_cifar_shaped_npz(root / 'cifar_shaped.npz',
                                               args.resnet_examples), args)
  raise SystemExit(f'unknown run {name!r}')


def add_resnet_arguments(parser, epochs: int) -> None:
  """The ``resnet`` run's options (also ``benchmarks/resume_compile.py``'s)."""
  parser.add_argument('--resnet-epochs', type=int, default=epochs)
  parser.add_argument('--resnet-model', default='resnet32')
  parser.add_argument('--resnet-batch', type=int, default=128)
  parser.add_argument('--resnet-examples', type=int, default=1280)
  parser.add_argument('--num-workers', type=int, default=0)
  parser.add_argument('--augment-on', choices=('auto', 'host', 'device'), default='auto',
                      help="data.augment_on: 'host' is grain's NumPy augmentation")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default='main,resnet')
  add_resnet_arguments(parser, epochs=3)
  parser.add_argument('--steps-per-dispatch', type=int, default=None,
                      help='default: the config default')
  parser.add_argument('--out', default='benchmarks/results/loop_efficiency.json')
  args = parser.parse_args()

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    for name in args.runs.split(','):
      c = run_config(name, args, root)
      if args.steps_per_dispatch:
        c.steps_per_dispatch = args.steps_per_dispatch
      results[name] = measure(name, c, root)
      results[name]['config'] = {k: v for k, v in c.to_dict().items()
                                 if k in ('epochs', 'data', 'model', 'optimizer')}

  report = dict(device=str(jax.devices()[0]), platform=jax.devices()[0].platform,
                cpu_count=os.cpu_count(), machine=platform.machine(), jax=jax.__version__,
                runs=results)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f'wrote {out}')
  print(f"loop efficiency: {min(r['efficiency'] for r in results.values()):.3f}")


if __name__ == '__main__':
  main()
