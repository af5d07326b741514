"""Per-device memory of the ResNet-50 train step, replicated vs FSDP-sharded state.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/fsdp_memory.py

Compiles the SGD and SSE-SAM (stage 1) steps of ResNet-50 (1000 classes, 25.6M
parameters) on 8 fake CPU devices, with the state replicated and FSDP-sharded,
and reports per device: the state's bytes at rest (its addressable shards), and
XLA's memory analysis of the compiled program (arguments, outputs, temporaries).
Nothing runs; only compilation. Images are 64x64 to keep compilation short:
the state does not depend on the image size, the temporaries do.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sse_sam_jax as ssj
from sse_sam_jax import losses, models
from sse_sam_jax.train import CompiledTrainStep, init_state, sharding

MB = 2 ** 20


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image', type=int, default=64)
  parser.add_argument('--methods', default='sgd,sse_sam')
  args = parser.parse_args()
  n = len(jax.devices())
  if n < 2:
    raise SystemExit('run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  mesh = sharding.make_mesh()
  model, params, stats = models.create('resnet50', 1000)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  groups = np.array([0] * 400 + [1] * 600, np.int32)
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  bsh = sharding.batch_sharding(mesh)
  batch = {'x': jax.ShapeDtypeStruct((args.batch, args.image, args.image, 3), jnp.float32,
                                     sharding=bsh),
           'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=bsh)}
  methods = {'sgd': None, 'sse_sam': lambda: ssj.sse_sam(0.05, 0.1, 10)}
  rows = {}
  for name in args.methods.split(','):
    for layout in ('replicated', 'fsdp'):
      parts = [methods[name]()] if methods[name] else []
      tx = optax.chain(*parts, optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
      state = jax.eval_shape(functools.partial(init_state, params, stats, tx))
      shardings = sharding.state_sharding(state, mesh, layout)
      state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           state, shardings)
      step = CompiledTrainStep(model, tx, loss, groups,
                               boundaries=[10] if name == 'sse_sam' else [],
                               state_sharding=shardings, batch_sharding=bsh)
      t0 = time.perf_counter()
      exe = step._jitted[0].lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      mem = exe.memory_analysis()
      state_bytes = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize
                        for s in jax.tree.leaves(state))
      rows[f'{name}/{layout}'] = dict(
          state_mb=state_bytes / MB, argument_mb=mem.argument_size_in_bytes / MB,
          output_mb=mem.output_size_in_bytes / MB, temp_mb=mem.temp_size_in_bytes / MB,
          compile_s=compile_s)
  print(f'ResNet-50, {num_params:,} parameters, {n} devices, batch {args.batch} '
        f'({args.batch // n} per device), {args.image}x{args.image} images; MiB per device')
  print('| step/state | state at rest | arguments | outputs | temporaries |')
  print('| --- | --- | --- | --- | --- |')
  for key, r in rows.items():
    print(f"| {key} | {r['state_mb']:.1f} | {r['argument_mb']:.1f} | {r['output_mb']:.1f} | "
          f"{r['temp_mb']:.1f} |")
  out = pathlib.Path('benchmarks/results/fsdp_memory.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'devices': n, 'batch': args.batch, 'image': args.image,
                             'num_params': int(num_params), 'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
