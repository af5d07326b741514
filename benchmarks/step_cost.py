"""Step cost of SGD, SAM, ImbSAM and SSE-SAM (stage 1 and 2) on CIFAR ResNet-32.

Runs the library's real jitted train step (``sse_sam_jax.train.jit_train_step``),
batch 128, 32x32x3 inputs, 10 classes with a CIFAR-10-LT label mix (tail = classes
with fewer than 1000 training images), SGD momentum 0.9 + weight decay. Timings
are interleaved (one step of each method per round) so that machine drift hits
all methods alike; every timed call starts from a copy of a warm state and waits
for the result. SSE-SAM stage 1 and stage 2 are the two programs of one
``CompiledTrainStep`` (static stages, compiled before the first step), run on
the state before and after the switch.

  python benchmarks/step_cost.py [--rounds 15] [--batch 128] [--out benchmarks/results/step_cost.json]
"""

from __future__ import annotations

import argparse
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

CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
SWITCH = 2


def methods():
  only = os.environ.get('STEP_COST_ONLY')
  all_methods = {
      'sgd': None,
      'sam': ssj.sam(0.05),
      'imbsam': ssj.imbsam(0.1),
      'sse_sam_stage1': ssj.sse_sam(0.05, 0.1, switch_step=SWITCH),
      'sse_sam_stage2': 'same compiled step as sse_sam_stage1, after the switch',
  }
  if only:  # e.g. STEP_COST_ONLY=sgd,sse_sam_stage1 for a quick look
    return {k: v for k, v in all_methods.items() if k in only.split(',')}
  return all_methods


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--model', default='resnet32')
  parser.add_argument('--out', default='benchmarks/results/step_cost.json')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  probs = np.asarray(CIFAR10_LT_COUNTS, np.float64)
  labels = rng.choice(10, size=args.batch, p=probs / probs.sum())
  labels[:4] = [0, 1, 8, 9]  # both groups present
  batch = {'x': jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(labels, jnp.int32)}
  class_groups = ssj.tail_classes(CIFAR10_LT_COUNTS, eta=1000).astype(np.int32)
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  model, params, batch_stats = models.create(args.model, 10, seed=0)

  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  steps, templates, compile_s = {}, {}, {}
  for name, direction in methods().items():
    if name == 'sse_sam_stage2':
      # The same CompiledTrainStep; the host's step index past the switch picks stage 2.
      steps[name] = (steps['sse_sam_stage1'][0], SWITCH)
      templates[name] = templates['sse_sam_stage1']
      continue
    tx = optax.chain(*([direction] if direction else []), optax.add_decayed_weights(2e-4),
                     optax.sgd(0.1, momentum=0.9))
    step = CompiledTrainStep(model, tx, loss, class_groups,
                             boundaries=[SWITCH] if name.startswith('sse_sam') else [])
    state = init_state(copy(params), copy(batch_stats), tx)
    compile_s[name] = step.precompile(state, [batch])
    state, metrics = step(state, batch, 0)  # warm
    state, metrics = step(state, batch, 1)
    jax.block_until_ready(metrics)
    steps[name], templates[name] = (step, 1), state

  times = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, (step, step_index) in steps.items():
      state = copy(templates[name])
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      out = step(state, batch, step_index)
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - t0)

  cache = steps['sse_sam_stage1'][0].compiles
  sgd_ms = statistics.median(times['sgd']) * 1e3
  results = {}
  for name, ts in times.items():
    ms = statistics.median(ts) * 1e3
    results[name] = dict(median_ms=round(ms, 2), ratio_to_sgd=round(ms / sgd_ms, 3),
                         compile_s=round(compile_s.get(name, compile_s['sse_sam_stage1']), 2))
  report = dict(model=args.model, batch=args.batch, rounds=args.rounds,
                device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                machine=platform.machine(), jax=jax.__version__,
                sse_sam_programs=cache, results=results)

  print(f'{args.model}, batch {args.batch}, {args.rounds} interleaved rounds, '
        f'{jax.devices()[0].platform}, jax {jax.__version__}')
  print('| method | median ms | ratio to SGD | compile s |')
  print('| --- | --- | --- | --- |')
  for name, r in results.items():
    print(f"| {name} | {r['median_ms']:.1f} | {r['ratio_to_sgd']:.2f} | {r['compile_s']:.1f} |")
  print(f'SSE-SAM: {cache} programs (one per stage), all compiled before the first step.')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
