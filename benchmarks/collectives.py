"""Collectives in the compiled train step on 8 fake CPU devices, per method and scope.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/collectives.py

Counts the all-reduce (and other collective) instructions in the optimized HLO
of the 1D-CNN train step (batch 128), for the global perturbation (jit over a
sharded batch), the per-device one (shard_map + one pmean of the direction),
each with replicated and FSDP-sharded state, and microbatches of 16.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sse_sam_jax as ssj
from sse_sam_jax import losses, models
from sse_sam_jax.train import CompiledTrainStep, init_state, sharding
from sse_sam_jax.train.step import MICROBATCH_AXIS

OPS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def count(text: str) -> dict:
  counts = collections.Counter()
  for line in text.splitlines():
    for op in OPS:
      if re.search(rf'= [^=]*\b{op}(-start)?\(', line):
        counts[op] += 1
  return dict(counts)


LAYOUTS = {  # name: (perturbation scope, parameter sharding, microbatch)
    'global': ('global', 'replicated', 0),
    'global+fsdp': ('global', 'fsdp', 0),
    'per_device': ('per_device', 'replicated', 0),
    'per_device+fsdp': ('per_device', 'fsdp', 0),
    'microbatch16': ('per_device', 'replicated', 16),  # as the trainer runs it
}


def main():
  n = len(jax.devices())
  if n < 2:
    raise SystemExit('run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  mesh = sharding.make_mesh()
  bsh = sharding.batch_sharding(mesh)
  model, params, stats = models.create('conv1d', 10)
  groups = np.array([0] * 4 + [1] * 6, np.int32)
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  batch = {'x': jax.ShapeDtypeStruct((128, 40), jnp.float32, sharding=bsh),
           'label': jax.ShapeDtypeStruct((128,), jnp.int32, sharding=bsh)}
  methods = {'sgd': None, 'sam': lambda: ssj.sam(0.05), 'imbsam': lambda: ssj.imbsam(0.1),
             'sse_sam': lambda: ssj.sse_sam(0.05, 0.1, 10)}
  report = {}
  for layout, (scope, params_layout, micro) in LAYOUTS.items():
    for name, direction in methods.items():
      parts = [direction()] if direction else []
      axes = (('data',) if scope == 'per_device' else ()) + (
          (MICROBATCH_AXIS,) if micro else ())
      if axes:
        parts.append(ssj.mean_across(axes))
      tx = optax.chain(*parts, optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
      state = init_state(params, stats, tx)
      # the 1D CNN is small: shard every array of >= 1024 elements (3 of its kernels)
      shardings = sharding.state_sharding(state, mesh, params_layout, min_elements=1024)
      step = CompiledTrainStep(model, tx, loss, groups,
                               boundaries=[10] if name == 'sse_sam' else [],
                               state_sharding=shardings, batch_sharding=bsh,
                               per_device_axis='data' if scope == 'per_device' else None,
                               microbatch=micro or None)
      step.precompile(jax.device_put(state, shardings), [batch])
      for (stage, _), exe in step._executables.items():
        key = f'{layout}/{name}' + (f'/stage{stage + 1}' if name == 'sse_sam' else '')
        report[key] = count(exe.as_text())
  print(f'{n} devices, 1D CNN (3 BatchNorm layers), batch 128')
  print('| layout/method | all-reduce | all-gather | reduce-scatter | other |')
  print('| --- | --- | --- | --- | --- |')
  for key, c in report.items():
    other = {k: v for k, v in c.items() if k not in ('all-reduce', 'all-gather', 'reduce-scatter')}
    print(f"| {key} | {c.get('all-reduce', 0)} | {c.get('all-gather', 0)} | "
          f"{c.get('reduce-scatter', 0)} | {other or '-'} |")
  out = pathlib.Path('benchmarks/results/collectives.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
