"""Step cost of SGD and the SAM family (SSE-SAM's stages, ASAM, Focal-SAM, per-shot radii,
the reuse steps of the LookSAM variants) on CIFAR ResNet-32.

Runs the library's real jitted train step (``sse_sam_jax.train.CompiledTrainStep``),
batch 128, 32x32x3 inputs, 10 classes with a CIFAR-10-LT label mix (tail = classes
with fewer than 1000 training images), SGD momentum 0.9 + weight decay. Timings
are interleaved (one step of each method per round) so that machine drift hits
all methods alike; every timed call starts from a copy of a warm state and waits
for the result. SSE-SAM stage 1 and stage 2 are the two programs of one
``CompiledTrainStep`` (static stages, compiled before the first step), run on
the state before and after the switch; the exact and reuse steps of a LookSAM
variant are its two kinds of program, picked by the host's step index.

  python benchmarks/step_cost.py [--rounds 15] [--batch 128] \
      [--out benchmarks/results/step_cost.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sse_sam_jax as ssj
from sse_sam_jax import losses, models
from sse_sam_jax.train import CompiledTrainStep, init_state
from sse_sam_jax.train.compiled_step import compiler_options

CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
SWITCH = 2
# Many / Medium / Few of CIFAR-10-LT (Many > 1000, Few < 200): the groups of shot_sam.
SHOT_GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], np.int32)
LOOKSAM = ssj.looksam(every=2)  # step 0 of a stage a sharpness step, step 1 a reuse step


def methods():
  """name -> (transform or None, class groups 'head_tail' / 'shots' / None, host step index).

  A name ending in ``_reuse`` is the reuse step of the LookSAM variant (one clean
  forward and backward pass); a run's average cost mixes it with the exact step."""
  only = os.environ.get('STEP_COST_ONLY')
  sse = lambda **kw: ssj.sse_sam(0.05, 0.1, switch_step=SWITCH, **kw)
  exact, reuse = sse(), sse(sharpness_steps=LOOKSAM)  # both stages share one compiled step
  all_methods = {
      'sgd': (None, None, 1),
      'sam': (ssj.sam(0.05), None, 1),
      'asam': (ssj.asam(0.5), None, 1),
      'imbsam': (ssj.imbsam(0.1), 'head_tail', 1),
      'sse_sam_stage1': (exact, 'head_tail', 1),
      'sse_sam_stage2': (exact, 'head_tail', SWITCH + 1),
      'adaptive_sse_sam_stage1': (sse(adaptive_eta=ssj.ASAM_ETA), 'head_tail', 1),
      'focal_sam': (ssj.focal_sam(0.05, lam=1.0, gamma=1.0, class_counts=CIFAR10_LT_COUNTS),
                    None, 1),
      'shot_sam': (ssj.group_sam((0.05, 0.075, 0.1)), 'shots', 1),
      'sse_sam_stage1_reuse': (reuse, 'head_tail', 1),
      'sse_sam_stage2_reuse': (reuse, 'head_tail', SWITCH + 1),
      'sam_reuse': (ssj.sam(0.05, sharpness_steps=LOOKSAM), None, 1),
  }
  if only:  # e.g. STEP_COST_ONLY=sgd,sse_sam_stage1 for a quick look
    return {k: v for k, v in all_methods.items() if k in only.split(',')}
  return all_methods


def run_averages(results, gamma=0.7, ks=(2, 3, 5, 10), fractions=(0.5, 0.2)):
  """Cost ratios to SGD averaged over a run of the cheaper SSE-SAM / SAM variants, from
  the measured exact and reuse steps: with a sharpness step every k steps a stage
  costs (exact + (k - 1) reuse) / k, on a random fraction p, p exact + (1 - p) reuse;
  SSE-SAM spends a fraction gamma of the run in stage 1."""
  r = lambda name: results[name]['ratio_to_sgd']
  out = {}
  if all(n in results for n in ('sse_sam_stage1', 'sse_sam_stage2', 'sse_sam_stage1_reuse',
                                'sse_sam_stage2_reuse')):
    mix = lambda exact, reuse, p: p * r(exact) + (1 - p) * r(reuse)
    sse = lambda p: (gamma * mix('sse_sam_stage1', 'sse_sam_stage1_reuse', p)
                     + (1 - gamma) * mix('sse_sam_stage2', 'sse_sam_stage2_reuse', p))
    out['sse_sam_exact'] = round(sse(1.0), 3)
    for k in ks:
      out[f'sse_sam_every_{k}'] = round(sse(1.0 / k), 3)
    for p in fractions:
      out[f'sse_sam_fraction_{p}'] = round(sse(p), 3)
  if 'sam' in results and 'sam_reuse' in results:
    for k in ks:
      out[f'sam_every_{k}'] = round((r('sam') + (k - 1) * r('sam_reuse')) / k, 3)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--model', default='resnet32',
                      help='resnet32, resnet34_cifar (32x32x3 inputs) or conv1d (the main job)')
  parser.add_argument('--cpu-convolutions', default='eigen',
                      help="XLA:CPU's convolutions: 'eigen' (the trainer's default) or 'ynnpack'")
  parser.add_argument('--out', default='benchmarks/results/step_cost.json')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  probs = np.asarray(CIFAR10_LT_COUNTS, np.float64)
  labels = rng.choice(10, size=args.batch, p=probs / probs.sum())
  labels[:4] = [0, 1, 8, 9]  # both groups present
  shape = (40,) if args.model == 'conv1d' else (32, 32, 3)  # MNIST-1D or CIFAR inputs
  batch = {'x': jnp.asarray(rng.normal(size=(args.batch,) + shape), jnp.float32),
           'label': jnp.asarray(labels, jnp.int32)}
  groups = {'head_tail': ssj.tail_classes(CIFAR10_LT_COUNTS, eta=1000).astype(np.int32),
            'shots': SHOT_GROUPS, None: None}
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  model, params, batch_stats = models.create(args.model, 10, seed=0)

  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  steps, templates, compile_s = {}, {}, {}
  built = {}  # one CompiledTrainStep per transform: both stages / kinds share it
  for name, (direction, group_kind, step_index) in methods().items():
    if id(direction) not in built or direction is None:
      tx = optax.chain(*([direction] if direction else []), optax.add_decayed_weights(2e-4),
                       optax.sgd(0.1, momentum=0.9))
      kinds = None if direction is None else functools.partial(ssj.sharpness_step_at, direction)
      step = CompiledTrainStep(model, tx, loss, groups[group_kind],
                               boundaries=ssj.stage_boundaries(direction) if direction else [],
                               sharpness_step_at=kinds,
                               compiler_options=compiler_options(args.cpu_convolutions))
      state = init_state(copy(params), copy(batch_stats), tx)
      t0 = time.perf_counter()
      for i in range(SWITCH + 2):  # every program a step index below runs: compiled, warm
        state, metrics = step(state, batch, i)
      jax.block_until_ready(metrics)
      built[id(direction)] = (step, state, time.perf_counter() - t0)
    step, state, seconds = built[id(direction)]
    compile_s[name] = seconds
    steps[name], templates[name] = (step, step_index), state

  times = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, (step, step_index) in steps.items():
      state = copy(templates[name])
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      out = step(state, batch, step_index)
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - t0)

  cache = steps['sse_sam_stage1'][0].compiles if 'sse_sam_stage1' in steps else 0
  sgd_ms = statistics.median(times['sgd']) * 1e3
  results = {}
  for name, ts in times.items():
    ms = statistics.median(ts) * 1e3
    results[name] = dict(median_ms=round(ms, 2), ratio_to_sgd=round(ms / sgd_ms, 3),
                         compile_and_warm_s=round(compile_s[name], 2))
  averages = run_averages(results)
  report = dict(model=args.model, batch=args.batch, rounds=args.rounds,
                cpu_convolutions=args.cpu_convolutions,
                device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                machine=platform.machine(), jax=jax.__version__,
                sse_sam_programs=cache, results=results, run_average_ratio_to_sgd=averages)

  print(f'{args.model}, batch {args.batch}, {args.rounds} interleaved rounds, '
        f'{jax.devices()[0].platform}, jax {jax.__version__}')
  print('| method | median ms | ratio to SGD | compile + warm s |')
  print('| --- | --- | --- | --- |')
  for name, r in results.items():
    print(f"| {name} | {r['median_ms']:.1f} | {r['ratio_to_sgd']:.2f} | "
          f"{r['compile_and_warm_s']:.1f} |")
  print('Averaged over a run (gamma 0.7 for SSE-SAM), ratio to SGD:')
  for name, ratio in averages.items():
    print(f'  {name}: {ratio:.2f}')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
