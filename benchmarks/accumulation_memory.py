"""Memory of a sharpness-aware update with ``ssj.microbatched``: full batch vs k microbatches.

Compiles (does not run) one jitted update of SAM, ImbSAM and SSE-SAM stage 1 on
CIFAR ResNet-32 (training-mode BatchNorm; each microbatch normalised with its own
statistics) at batch 512, 32x32x3 inputs, for k = 1 (the full batch, no
microbatching) and k = 4, 16, and reports XLA's ``memory_analysis()`` of each
program: temporaries (activations and gradients alive at once) and the total.
The update is the one the trainer's step makes: one clean forward shared through
``loss_vjp``, then the transform's passes.

  python benchmarks/accumulation_memory.py [--batch 512] \
      [--out benchmarks/results/accumulation_memory.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sse_sam_jax as ssj
from sse_sam_jax import models

CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--model', default='resnet32')
  parser.add_argument('--ks', default='1,4,16')
  parser.add_argument('--out', default='benchmarks/results/accumulation_memory.json')
  args = parser.parse_args()

  tail = ssj.tail_classes(CIFAR10_LT_COUNTS, eta=1000)
  model, params, batch_stats = models.create(args.model, 10, seed=0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
  methods = {'sam': ssj.sam(0.05), 'imbsam': ssj.imbsam(0.1, tail_classes=tail),
             'sse_sam_stage1': ssj.sse_sam(0.05, 0.1, switch_step=10, tail_classes=tail)}

  def per_example_loss(params, micro):
    logits, _ = model.apply(params, batch_stats, micro[0], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, micro[1])

  results = {}
  for name, transform in methods.items():
    tx = optax.chain(transform, optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    for k in [int(v) for v in args.ks.split(',')]:
      def update(params, state, x, y, k=k, tx=tx, name=name):
        loss_fn = ssj.microbatched(per_example_loss, (x, y), num_microbatches=k)
        losses, vjp_fn = jax.vjp(loss_fn, params)
        grads = vjp_fn(jnp.full_like(losses, 1 / losses.shape[0]))[0]
        kwargs = dict(stage=0) if name.startswith('sse_sam') else {}
        return tx.update(grads, state, params, loss_fn=loss_fn, loss_vjp=(losses, vjp_fn),
                         labels=y, **kwargs)
      t0 = time.perf_counter()
      compiled = jax.jit(update).lower(params, state, x, y).compile()
      mem = compiled.memory_analysis()
      results[f'{name}/k={k}'] = dict(
          temp_mib=round(mem.temp_size_in_bytes / 2**20, 1),
          total_mib=round((mem.temp_size_in_bytes + mem.argument_size_in_bytes
                           + mem.output_size_in_bytes) / 2**20, 1),
          compile_s=round(time.perf_counter() - t0, 1))
      print(name, k, results[f'{name}/k={k}'], flush=True)

  print(f'\n{args.model}, batch {args.batch}, {jax.devices()[0].platform}, jax {jax.__version__}')
  print('| method | k | temporaries MiB | total MiB | temporaries / k=1 |')
  print('| --- | --- | --- | --- | --- |')
  for key, r in results.items():
    name, k = key.split('/k=')
    base = results[f'{name}/k=1']['temp_mib']
    print(f"| {name} | {k} | {r['temp_mib']} | {r['total_mib']} | {r['temp_mib'] / base:.2f} |")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(model=args.model, batch=args.batch, jax=jax.__version__,
                                 device=str(jax.devices()[0]), results=results), indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
