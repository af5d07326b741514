"""Cost of one Lanczos iteration (one group HVP over the data + reorthogonalisation)
against one gradient evaluation over the same data, on CIFAR ResNet-32.

  python benchmarks/hessian_cost.py [--batches 4] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from sse_sam_jax import analysis, losses, models
from sse_sam_jax.data import Split


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=4)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--iters', type=int, default=20, help='Lanczos basis size at timing')
  parser.add_argument('--out', default='benchmarks/results/hessian_cost.json')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  n = args.batches * args.batch
  split = Split(rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n), 10)
  model, params, batch_stats = models.create('resnet32', 10)
  loss = analysis.model_loss(model, batch_stats, losses.cross_entropy)
  w = analysis.example_weights(split.label, np.ones(10, bool), 10)
  g = analysis.GroupLoss(loss, params, split.x, split.label, w, batch_size=args.batch)
  v = jax.random.normal(jax.random.key(0), (g.dim,))
  basis = jax.random.normal(jax.random.key(1), (args.iters, g.dim))
  reorth = jax.jit(lambda w, V: w - V.T @ (V @ w))

  def lanczos_iteration():
    w_ = g.hvp(v)
    return reorth(reorth(w_, basis), basis)

  timings = {'gradient': [], 'lanczos_iteration': []}
  fns = {'gradient': g.grad, 'lanczos_iteration': lanczos_iteration}
  for f in fns.values():
    jax.block_until_ready(f())  # compile
  for _ in range(args.repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      timings[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v_) for k, v_ in timings.items()}
  ratio = med['lanczos_iteration'] / med['gradient']
  report = dict(model='resnet32', examples=n, params=g.dim, repeats=args.repeats,
                gradient_s=round(med['gradient'], 3),
                lanczos_iteration_s=round(med['lanczos_iteration'], 3), ratio=round(ratio, 3))
  print(f"ResNet-32, {n} examples, {g.dim} parameters: gradient {med['gradient']:.2f} s, "
        f"one Lanczos iteration {med['lanczos_iteration']:.2f} s, ratio {ratio:.2f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
