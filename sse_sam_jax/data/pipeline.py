"""The grain training pipeline: seeded epochs, batches, augmentation, host sharding, state.

Batch ``s`` of training is a pure function of ``(seed, s)``: epoch ``e = s //
steps_per_epoch`` is a permutation drawn from ``(seed, e)``, the batch its
``s % steps_per_epoch``-th slice, and augmentation draws from ``(seed, s)``.
The grain iterator over step indices therefore restores exactly from its
state (``get_state``/``set_state``), on any number of workers. On a multi-host
mesh each process takes its rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import grain
import numpy as np

from sse_sam_jax.data.sources import Split

# (x_batch, rng) -> augmented x_batch
BatchAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# (batch size, rng) -> the augmentation's random choices, one array each (see
# augment.pad_crop_flip_draws); the device applies them to the images it holds
AugmentDraws = Callable[[int, np.random.Generator], dict]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  batch_size: int
  drop_remainder: bool = False

  def steps_per_epoch(self, n: int) -> int:
    if self.batch_size < 1:
      raise ValueError(f'batch size must be >= 1, got {self.batch_size}.')
    if self.drop_remainder and n < self.batch_size:
      raise ValueError(f'{n} examples make no full batch of {self.batch_size}.')
    return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

  def full_batches(self, n: int) -> int:
    """The number of full batches in an epoch of ``n`` examples."""
    return n // self.batch_size

  def batch_sizes(self, n: int) -> list[int]:
    """The distinct batch sizes of an epoch (a full one and maybe the remainder)."""
    sizes = [self.batch_size]
    if not self.drop_remainder and n % self.batch_size:
      sizes.append(n % self.batch_size)
    return sizes


class _MakeBatch:
  """Picklable map: global step index -> batch dict (for grain workers)."""

  def __init__(self, split: Split, spec: BatchSpec, seed: int, augment: BatchAugment | None,
               process_index: int, process_count: int, order: np.ndarray | None = None,
               augment_draws: AugmentDraws | None = None):
    self.split, self.spec, self.seed, self.augment = split, spec, seed, augment
    self.augment_draws = augment_draws
    self.order = order
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = spec.steps_per_epoch(len(split))
    self._permutations = {}  # epoch -> permutation: the current and the next epoch's

  def _permutation(self, epoch: int) -> np.ndarray:
    if self.order is not None:
      return self.order[epoch]
    if epoch not in self._permutations:
      while len(self._permutations) >= 2:
        self._permutations.pop(min(self._permutations))
      self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
          len(self.split))
    return self._permutations[epoch]

  def __call__(self, step: int) -> dict:
    step = int(step)
    epoch, b = divmod(step, self.steps_per_epoch)
    ids = self._permutation(epoch)[b * self.spec.batch_size:(b + 1) * self.spec.batch_size]
    if len(ids) % self.process_count:
      raise ValueError(f'batch of {len(ids)} does not split over {self.process_count} hosts.')
    per_host = len(ids) // self.process_count
    ids = ids[self.process_index * per_host:(self.process_index + 1) * per_host]
    rng = np.random.default_rng([self.seed, 1 << 20, step])
    if self.augment_draws is not None:  # the device gathers and augments
      return {'ids': ids.astype(np.int32), **self.augment_draws(len(ids), rng),
              'label': self.split.label[ids], 'step': np.int64(step)}
    if hasattr(self.split.x, 'gather'):  # lazily read images: augmentation happens on decode
      x = self.split.x.gather(ids, rng if self.augment is not None else None)
    else:
      x = self.split.x[ids]
      if self.augment is not None:
        x = self.augment(x, rng)
    return {'x': x, 'label': self.split.label[ids], 'step': np.int64(step)}


def train_batches(split: Split, spec: BatchSpec, *, num_epochs: int, seed: int,
                  augment: BatchAugment | None = None, num_workers: int = 0,
                  prefetch_batches: int = 2, process_index: int = 0,
                  process_count: int = 1, order: np.ndarray | None = None,
                  augment_draws: AugmentDraws | None = None) -> grain.IterDataset:
  """A grain ``IterDataset`` of all training batches; ``iter()`` it and keep its state.

  Each batch is a dict: ``'x'``, ``'label'`` and ``'step'`` (the global step index).
  With ``augment_draws`` (instead of ``augment``; in-memory arrays only) a batch carries
  no images: ``'ids'`` (the examples' int32 indices into ``split.x``) and the
  augmentation's random choices, drawn from the same generator as ``augment`` would
  (e.g. :func:`~sse_sam_jax.data.augment.pad_crop_flip_draws`), for a program on the
  device to gather and augment the images there
  (:func:`~sse_sam_jax.data.augment.pad_crop_flip_on_device`).

  ``order`` (int ``[num_epochs, N]``, see :func:`load_batch_order`): epoch ``e`` takes
  the examples in the order of row ``e`` instead of the seeded permutation.

  ``prefetch_batches`` batches are made ahead, in as many threads (0: each when it is
  asked for). Grain's default read-ahead is 500 elements in 16 threads: for our
  elements, whole batches, that held 740 MB of CIFAR batches one batch into a run (an
  ImageNet batch of 256 is 154 MB) and kept 16 threads competing with the step.
  """
  if order is not None:
    order = check_batch_order(order, num_epochs, len(split))
  if augment_draws is not None and (augment is not None or not isinstance(split.x, np.ndarray)):
    raise ValueError('augment_draws: the device augments in-memory images only, and in '
                     'place of augment (got both, or a lazy image reader).')
  make = _MakeBatch(split, spec, seed, augment, process_index, process_count, order,
                    augment_draws)
  read = grain.ReadOptions(num_threads=prefetch_batches, prefetch_buffer_size=prefetch_batches)
  ds = grain.MapDataset.range(num_epochs * make.steps_per_epoch).map(make).to_iter_dataset(read)
  if num_workers > 0:
    from absl import flags  # grain's worker processes read absl flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def check_batch_order(order, num_epochs: int, n: int, source: str = 'batch order'
                      ) -> np.ndarray:
  """``order`` as int64 ``[num_epochs, n]`` if each of its first ``num_epochs`` rows is a
  permutation of ``range(n)``; ``ValueError`` saying what is wrong otherwise."""
  order = np.asarray(order)
  if order.ndim != 2 or order.shape[0] < num_epochs or order.shape[1] != n:
    raise ValueError(f'{source}: expected [epochs >= {num_epochs}, {n}] example indices '
                     f'(one row per epoch), got shape {list(order.shape)}.')
  if not np.issubdtype(order.dtype, np.integer):
    raise ValueError(f'{source}: example indices must be integers, got {order.dtype}.')
  order = order[:num_epochs].astype(np.int64)
  for e, row in enumerate(order):
    if not np.array_equal(np.sort(row), np.arange(n)):
      raise ValueError(f'{source}: row {e} is not a permutation of the {n} training examples.')
  return order


def load_batch_order(path, num_epochs: int, n: int) -> np.ndarray:
  """The ``.npy`` of ``data.batch_order``, checked (:func:`check_batch_order`)."""
  try:
    order = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'data.batch_order: cannot read {path} ({e}); it must be a .npy of '
                     f'[epochs, {n}] example indices.') from None
  return check_batch_order(order, num_epochs, n, f'data.batch_order {path}')


def eval_batches(split: Split, batch_size: int, transform=None):
  """Deterministic evaluation batches (in order, last one partial)."""
  for start in range(0, len(split), batch_size):
    x = split.x[start:start + batch_size]
    yield {'x': x if transform is None else transform(x),
           'label': split.label[start:start + batch_size]}


def wait_for_shared_memory_release(timeout_s: float = 10.0) -> None:
  """Waits until grain has unlinked the shared memory of the batches already freed.

  Batches from worker processes live in shared memory that grain unlinks on a
  background thread pool when the last reference goes; a process that exits
  before that thread runs leaves the segments behind ("leaked shared_memory
  objects" at exit). The pool takes its tasks in order, so a no-op task that has
  run means every earlier unlink has. Uses grain's class attribute
  ``SharedMemoryArray._del_thread_pool`` and does nothing where it is absent.
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  thread_pool = getattr(shared_memory_array.SharedMemoryArray, '_del_thread_pool', None)
  if thread_pool is not None:
    try:
      thread_pool.apply_async(lambda: None).wait(timeout_s)
    except ValueError:  # the pool was closed
      pass
