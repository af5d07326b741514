"""How the loop's steps are grouped into dispatches and put on the devices.

``steps_per_dispatch`` consecutive batches of the full shape, of one epoch and one stage,
run as one compiled program (:func:`sse_sam_jax.train.compiled_step.scan_steps`);
:class:`DispatchPlan` (:func:`plan`) decides the grouping from the step index alone,
:func:`programs` lists the programs a run needs in the order of first use (built before
step 0, or the first one before and the others in background threads:
:func:`background_compile_threads`), :func:`train_batches` is the run's grain pipeline, and
:func:`device_batch` stacks the host batches of a dispatch (the epoch's last, partial,
one padded to a full batch with a mask: :func:`pad`) and places them on the mesh, where
indices and draws become augmented images (``data.augment_on``,
:mod:`sse_sam_jax.train.device_images`).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from sse_sam_jax import data as data_lib
from sse_sam_jax.data import augment as augment_lib
from sse_sam_jax.train import setup
from sse_sam_jax.train.compiled_step import CompiledTrainStep, stacked
from sse_sam_jax.train.device_images import DRAWS


def steps_per_dispatch(c, chunkable: int | None = None) -> int:
  """The config's ``steps_per_dispatch``; 0 (auto) is 1 on CPUs and on accelerators
  the divisor of ``chunkable`` (the epoch's steps that may share a dispatch, see
  :func:`plan`) nearest to 8 within 4..16 (the larger of two as near), else 8: on one
  H200 the main job's loop took 8.2 s at 8 against 15.1 s at 1; a divisor leaves no
  single steps at the epoch's end, so each stage needs one program, not two (the
  recipe's 170 steps per epoch: 10). On 2 CPU cores the examples/s did not change and
  each stage compiled a second program."""
  if c.steps_per_dispatch:
    return int(c.steps_per_dispatch)
  o = c.optimizer
  if c.model.running_stats == 'last_perturbed' and (o.sharpness_every > 1
                                                    or o.sharpness_fraction < 1):
    return 1  # the kind of every step is chosen on the host (see config.validate)
  if jax.default_backend() == 'cpu':
    return 1
  divisors = [k for k in range(4, 17) if chunkable and chunkable % k == 0]
  return min(divisors, key=lambda k: (abs(k - 8), -k)) if divisors else 8


def plan(c, run: setup.Run) -> DispatchPlan:
  """The run's :class:`DispatchPlan`. With the epoch's last batch padded to the full
  shape (``run.pads_last_batch``) every step of an epoch may share a dispatch; without,
  its full batches only (the partial one has a program of its own shape)."""
  n = len(run.data.train)
  chunkable = run.steps_per_epoch if run.pads_last_batch else run.spec.full_batches(n)
  return DispatchPlan(steps_per_dispatch(c, chunkable), run.steps_per_epoch, chunkable,
                      run.boundaries)


def background_compile_threads(c) -> int:
  """The config's ``background_compile_threads``; -1 (auto) is 0 on CPUs and
  ``min(4, host cores // 4)`` (at least 1) on accelerators. On 2 CPU cores a compile
  thread takes the step's cores: the main job waited 6.2-6.5 s for programs instead of
  12.0-13.2 s, but its loop ran 25% slower, and its wall time did not drop (59.8 and
  63.9 s with one thread, 57.9 and 61.9 s without)."""
  if c.background_compile_threads >= 0:
    return int(c.background_compile_threads)
  if jax.default_backend() == 'cpu':
    return 0
  return min(4, max(1, (os.cpu_count() or 1) // 4))


class DispatchPlan:
  """How many steps each dispatch runs: ``steps_per_dispatch`` (``k``) consecutive
  batches among the epoch's first ``full_batches`` (the batches of the full shape: with a
  padded last batch, all of them; :func:`plan`) of one stage in one program, counted from
  the epoch's start; every other step (the epoch's remainder, an unpadded last partial
  batch, the steps up to the next multiple of ``k`` after a resume) on its own. Decided
  from the step index alone, so a resumed run dispatches the same steps together as an
  uninterrupted one."""

  def __init__(self, steps_per_dispatch: int, steps_per_epoch: int, full_batches: int,
               boundaries):
    self.k, self.spe, self.full = int(steps_per_dispatch), steps_per_epoch, full_batches
    self.boundaries = sorted(boundaries)

  def steps_from(self, step: int, stop: int | None = None) -> int:
    if self.k == 1:
      return 1
    into_epoch = step % self.spe
    end = step - into_epoch + self.full  # the end of the epoch's batches of the full shape
    end = min([end] + [b for b in self.boundaries if b > step] + ([stop] if stop else []))
    return self.k if into_epoch % self.k == 0 and step + self.k <= end else 1

  def dispatches(self, start: int, total: int) -> list:
    """``(first step, steps)`` of every dispatch from ``start`` to ``total``."""
    dispatches, step = [], start
    while step < total:
      n = self.steps_from(step)
      dispatches.append((step, n))
      step += n
    return dispatches


def programs(run: setup.Run, dispatches, train_step: CompiledTrainStep) -> list:
  """``((stage, sharpness_step), batch shape)`` of every distinct program the dispatches
  need, sharded, in the order of their first use."""
  example, n_train = tuple(run.data.train.x.shape[1:]), len(run.data.train)
  sizes = run.spec.batch_sizes(n_train)[:1 if run.pads_last_batch else None]
  needed = {}
  for step, n in dispatches:
    last_of_epoch = (step + 1) % run.steps_per_epoch == 0
    b = sizes[-1] if n == 1 and last_of_epoch else sizes[0]
    needed.setdefault((train_step.kind_at(step, n), n, b), None)
  out = []
  for kind, n, b in needed:
    lead = (n,) if n > 1 else ()
    sharding = stacked(run.batch_sharding) if n > 1 else run.batch_sharding
    spec = {'x': jax.ShapeDtypeStruct(lead + (b,) + example, np.float32, sharding=sharding),
            'label': jax.ShapeDtypeStruct(lead + (b,), np.int32, sharding=sharding)}
    if run.pads_last_batch:
      spec['mask'] = jax.ShapeDtypeStruct(lead + (b,), np.bool_, sharding=sharding)
    out.append((kind, spec))
  return out


def train_batches(c, run: setup.Run, order=None):
  """The run's grain dataset of training batches (this host's rows): augmented on the
  host (lazy sources: random-resized crops and flips on decode), or, with
  ``run.device_images``, indices and draws for the devices to augment."""
  on_device = run.device_images is not None
  return data_lib.train_batches(
      run.data.train, run.spec, num_epochs=c.epochs, seed=c.seed, order=order,
      augment=augment_lib.pad_crop_flip if c.data.augment and not on_device else None,
      augment_draws=augment_lib.pad_crop_flip_draws if on_device else None,
      num_workers=c.data.num_workers, prefetch_batches=c.data.prefetch_batches,
      process_index=jax.process_index(), process_count=jax.process_count())


def pad(batch: dict, size: int, shards: int) -> dict:
  """``batch`` (this host's rows) padded to ``size`` rows with a ``'mask'``, False on
  padding: each of the host's ``shards`` device shards gets an equal share of the real
  rows first, as the unpadded batch would split (zeros after, label 0)."""
  rows = len(batch['label'])  # (padded ids and draws are 0: the device zeroes those rows)
  if rows == size:
    return dict(batch, mask=np.ones(size, np.bool_))
  if rows % shards or size % shards:
    raise ValueError(f'{rows} rows padded to {size} do not split over {shards} shards.')
  out = {'step': batch['step']}
  for key in (k for k in batch if k != 'step'):  # x, label (or ids and draws)
    a = batch[key].reshape((shards, rows // shards) + batch[key].shape[1:])
    widths = [(0, 0), (0, (size - rows) // shards)] + [(0, 0)] * (a.ndim - 2)
    out[key] = np.pad(a, widths).reshape((size,) + batch[key].shape[1:])
  real = np.arange(size // shards) < rows // shards
  out['mask'] = np.tile(real, shards)
  return out


def device_batch(batches: list, step: int, run: setup.Run):
  """The host batches of the steps from ``step`` on the mesh (each host holds its rows
  of the global batch); several are stacked along a leading axis. Batches of indices
  and draws (``data.augment_on``) become images there (``run.device_images``)."""
  assert [int(b['step']) for b in batches] == list(range(step, step + len(batches)))
  if run.pads_last_batch:
    size = run.spec.batch_size // jax.process_count()  # this host's rows of a full batch
    shards = run.mesh.devices.size // jax.process_count()
    batches = [pad(b, size, shards) for b in batches]
  dtypes = {'x': run.input_dtype, 'label': np.int32, 'mask': np.bool_, 'ids': np.int32,
            **DRAWS}
  host = {k: np.stack([b[k] for b in batches]).astype(dtypes[k], copy=False)
          for k in batches[0] if k != 'step'}
  sharding = run.batch_sharding
  if len(batches) == 1:
    host = jax.tree.map(lambda a: a[0], host)
  else:
    sharding = stacked(sharding)
  if jax.process_count() > 1:
    placed = jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), host)
  else:
    placed = jax.device_put(host, sharding)
  # with data.augment_on: indices and draws -> the augmented images, made on the devices
  return placed if run.device_images is None else run.device_images(placed)
