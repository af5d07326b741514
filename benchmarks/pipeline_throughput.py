"""Input pipeline throughput (examples/s) on CIFAR-shaped data with augmentation, against
the ResNet-32 SGD train step's examples/s measured in the same run, and the full
step throughput of the real pipeline feeding the ResNet-32 SSE-SAM step.

  python benchmarks/pipeline_throughput.py [--workers 2] [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sse_sam_jax import data, losses, models
from sse_sam_jax.data import augment
from sse_sam_jax.train import CompiledTrainStep, init_state


def pipeline_rate(split, batch, workers, num_batches):
  ds = data.train_batches(split, data.BatchSpec(batch, drop_remainder=True), num_epochs=100,
                          seed=0, augment=augment.pad_crop_flip, num_workers=workers)
  it = iter(ds)
  for _ in range(5):  # start the workers
    next(it)
  t0 = time.perf_counter()
  for _ in range(num_batches):
    b = next(it)
    augment.normalize_images(b['x'])  # as the trainer's input would be
  return num_batches * batch / (time.perf_counter() - t0)


def sgd_rate(batch, steps=5):
  model, params, stats = models.create('resnet32', 10)
  tx = optax.sgd(0.1, momentum=0.9)
  step = CompiledTrainStep(model, tx, lambda l, y, s: losses.cross_entropy(l, y))
  state = init_state(params, stats, tx)
  b = {'x': jnp.zeros((batch, 32, 32, 3)), 'label': jnp.zeros((batch,), jnp.int32)}
  state, m = step(state, b, 0)
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, b, i + 1)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return batch / statistics.median(times)


def full_step_rate(split, batch, workers, steps=4):
  """Real pipeline -> device -> ResNet-32 SSE-SAM step (stage 1), examples/s end to end."""
  import sse_sam_jax as ssj
  model, params, stats = models.create('resnet32', 10)
  tx = optax.chain(ssj.sse_sam(0.05, 0.1, 10**6), optax.sgd(0.1, momentum=0.9))
  groups = np.array([0] * 4 + [1] * 6, np.int32)
  step = CompiledTrainStep(model, tx, lambda l, y, s: losses.cross_entropy(l, y), groups,
                           boundaries=[10**6])
  state = init_state(params, stats, tx)
  ds = data.train_batches(split, data.BatchSpec(batch, drop_remainder=True), num_epochs=100,
                          seed=0, augment=augment.pad_crop_flip, num_workers=workers)
  it = iter(ds)
  to_device = lambda b: {'x': jnp.asarray(augment.normalize_images(b['x'])),
                         'label': jnp.asarray(b['label'], jnp.int32)}
  state, m = step(state, to_device(next(it)), 0)  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = step(state, to_device(next(it)), i + 1)
  jax.block_until_ready(m)
  return steps * batch / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--out', default='benchmarks/results/pipeline_throughput.json')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  split = data.Split(rng.integers(0, 256, (12406, 32, 32, 3), dtype=np.uint8),
                     rng.integers(0, 10, 12406), 10, 'cifar-shaped')
  pipe = pipeline_rate(split, args.batch, args.workers, args.batches)
  train = sgd_rate(args.batch)
  full = full_step_rate(split, args.batch, args.workers)
  report = dict(workers=args.workers, batch=args.batch, pipeline_examples_per_s=round(pipe),
                resnet32_sgd_examples_per_s=round(train, 1), ratio=round(pipe / train, 1),
                full_step_sse_sam_examples_per_s=round(full, 1))
  print(f'pipeline ({args.workers} workers, pad-crop-flip + normalize): {pipe:.0f} examples/s; '
        f'ResNet-32 SGD step: {train:.0f} examples/s; ratio {pipe / train:.1f}x; '
        f'real pipeline + ResNet-32 SSE-SAM (stage 1) step: {full:.1f} examples/s')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
