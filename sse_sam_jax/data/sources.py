"""Data sources: the in-memory :class:`Split`, arrays (``.npz``) and the offline MNIST-1D-LT
(TFDS datasets: :mod:`sse_sam_jax.data.tfds_sources`).

A source here is a :class:`Split`: in-memory ``x`` and integer ``label`` arrays
plus a name. CIFAR-sized long-tailed training sets (12k-11k images) and
MNIST-1D fit in memory, so they are read once through random access and kept
as arrays; batches are then gathered by index in the grain pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from sse_sam_jax.data import profiles


class DatasetNotPreparedError(RuntimeError):
  """The dataset is not on disk; the message says how to prepare it."""


@dataclasses.dataclass
class Split:
  x: Any  # an array [N, ...], or images read on demand (tfds_sources.LazyImages)
  label: np.ndarray
  num_classes: int
  name: str = ''

  def __post_init__(self):
    self.label = np.asarray(self.label)
    if not np.issubdtype(self.label.dtype, np.integer):
      raise ValueError(f'{self.name}: labels must be integers, got {self.label.dtype}.')
    self.label = self.label.astype(np.int32)
    if len(self.x) != len(self.label):
      raise ValueError(f'{self.name}: {len(self.x)} inputs but {len(self.label)} labels.')
    if len(self.label) == 0:
      raise ValueError(f'{self.name}: the split is empty.')
    if self.label.min() < 0 or self.label.max() >= self.num_classes:
      raise ValueError(f'{self.name}: labels must lie in [0, {self.num_classes}); found '
                       f'{self.label.min()}..{self.label.max()}.')

  def __len__(self):
    return len(self.label)

  def subset(self, indices, name=None) -> Split:
    take_rows = getattr(self.x, 'take_rows', None)  # images read on demand stay unread
    x = take_rows(indices) if take_rows is not None else self.x[indices]
    return Split(x, self.label[indices], self.num_classes, name or self.name)


@dataclasses.dataclass
class LongTailData:
  """Train (long-tailed), validation (held out from train) and test (balanced) splits."""
  train: Split
  test: Split
  val: Split | None = None
  dataset: str = ''


def make_long_tailed(train: Split, imbalance_factor: float, *, profile: str = 'exp',
                     selection: str = 'shuffle', seed: int = 0, n_max: int | None = None) -> Split:
  """Subsamples a (roughly) balanced split to a long-tailed profile."""
  available = np.bincount(train.label, minlength=train.num_classes)
  empty = np.flatnonzero(available == 0)
  if empty.size:
    raise ValueError(f'{train.name}: classes {short_list(empty.tolist())} have no example '
                     f'({empty.size} of {train.num_classes}).')
  n_max = int(available.min() if n_max is None else n_max)
  counts = profiles.long_tail_counts(n_max, train.num_classes, imbalance_factor, profile)
  try:
    idx = profiles.select_long_tail(train.label, counts, selection=selection, seed=seed)
  except ValueError as e:
    raise ValueError(f'{train.name}: {e} The data are subsampled to imbalance factor '
                     f'{imbalance_factor:g} from the smallest class ({n_max} examples); for '
                     'data that are long-tailed already, data.imbalance_factor=1 keeps them '
                     'as they are.') from None
  return train.subset(idx, f'{train.name}-LT{imbalance_factor:g}')


def hold_out(train: Split, fraction: float, seed: int = 0) -> tuple[Split, Split | None]:
  """Splits off ``fraction`` of every class (at least one example, never a class's last)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'validation fraction must lie in [0, 1), got {fraction}.')
  if fraction == 0.0:
    return train, None
  rng = np.random.RandomState(seed)
  keep, val = [], []
  for c in range(train.num_classes):
    idx = np.flatnonzero(train.label == c)
    rng.shuffle(idx)
    n_val = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
    val.append(idx[:n_val])
    keep.append(idx[n_val:])
  return (train.subset(np.sort(np.concatenate(keep))),
          train.subset(np.sort(np.concatenate(val)), train.name + '-val'))


# ----------------------------------------------------------------------------
# Bring your own arrays
# ----------------------------------------------------------------------------
def _read_npz(path: pathlib.Path, x_key: str, label_key: str):
  """``(x, labels)`` of an ``.npz``, checked: keys, lengths, integer labels >= 0, finite x."""
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist (expected an .npz with arrays '
                            f'{x_key!r} and {label_key!r}).')
  try:
    data = np.load(path)
    keys = list(data.keys())
  except Exception as e:  # pylint: disable=broad-except  (not an npz: many error types)
    raise ValueError(f'{path} is not a readable .npz file ({type(e).__name__}: {e}).') from None
  missing = [k for k in (x_key, label_key) if k not in keys]
  if not missing and data[label_key].size == 0:
    raise ValueError(f'{path}: {label_key!r} is empty; the file has no examples.')
  if missing:
    raise ValueError(f'{path} has arrays {keys}, not {missing}; it needs inputs {x_key!r} and '
                     f'labels {label_key!r}.')
  x, labels = data[x_key], data[label_key]
  if labels.ndim != 1 or x.ndim < 2 or len(x) != len(labels):
    raise ValueError(f'{path}: {x_key!r} has shape {x.shape} and {label_key!r} {labels.shape}; '
                     'they need one row per example and one integer label per row.')
  if not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)):
      raise ValueError(f'{path}: labels must be integers, got dtype {labels.dtype}.')
    labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    raise ValueError(f'{path}: labels must be >= 0; found {int(labels.min())}.')
  if np.issubdtype(x.dtype, np.floating):
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
      raise ValueError(f'{path}: {int(bad.sum())} example(s) hold NaN or Inf inputs (rows '
                       f'{np.flatnonzero(bad)[:5].tolist()}...); clean them first.')
  return x, labels


def short_list(values, most: int = 10) -> str:
  """``[a, b, ...]`` with at most ``most`` items shown and the count of the rest."""
  values = list(values)
  shown = ', '.join(str(v) for v in values[:most])
  return f'[{shown}]' if len(values) <= most else f'[{shown}, ... {len(values) - most} more]'


def _num_classes(path, labels: np.ndarray, num_classes: int | None) -> int:
  """The class count: ``num_classes``, or ``max(label) + 1`` when that is plausible.
  Checked before anything is sized by it (a stray label of 10^9 must not allocate)."""
  distinct = np.unique(labels)
  if distinct.size < 2:
    raise ValueError(f'{path}: {distinct.size} distinct label(s) '
                     f'{short_list(distinct.tolist())}; a classifier needs at least 2 classes.')
  top = int(distinct[-1]) + 1
  if num_classes:
    if top > num_classes:
      raise ValueError(f'{path}: label {top - 1} is out of range for data.num_classes='
                       f'{num_classes} (labels must be 0..{num_classes - 1}).')
    return int(num_classes)
  if top > 2 * distinct.size + 16:
    raise ValueError(f'{path}: labels go up to {top - 1} but only {distinct.size} distinct '
                     f'values occur ({short_list(distinct.tolist())}); labels must be 0..C-1: '
                     'remap them, or set data.num_classes=C if there really are C classes.')
  return top


def npz_long_tail(path, imbalance_factor: float | None = None, *, num_classes=None,
                  x_key='x', label_key='y', test_path=None, test_fraction=0.2, seed=0,
                  val_fraction=0.0, profile='exp', selection='shuffle') -> LongTailData:
  """An ``.npz`` with inputs and labels; optional LT subsampling (``imbalance_factor``)."""
  path = pathlib.Path(path)
  x, labels = _read_npz(path, x_key, label_key)
  num_classes = _num_classes(path, labels, num_classes)
  full = Split(x, labels, num_classes, path.stem)
  if test_path is not None:
    tx, ty = _read_npz(pathlib.Path(test_path), x_key, label_key)
    if ty.max() >= num_classes:
      raise ValueError(f'{test_path}: label {int(ty.max())} is out of range for the '
                       f'{num_classes} classes of {path}.')
    train, test = full, Split(tx, ty, num_classes, path.stem + '-test')
  else:
    train, test = hold_out(full, test_fraction, seed + 1)
    if test is None:
      raise ValueError(f'{path}: test_fraction must be > 0 without a test file, got '
                       f'{test_fraction}.')
  if imbalance_factor is not None:
    train = make_long_tailed(train, imbalance_factor, profile=profile, selection=selection,
                             seed=seed)
  train, val = hold_out(train, val_fraction, seed)
  return LongTailData(train, test, val, path.stem)


# ----------------------------------------------------------------------------
# Offline benchmark: MNIST-1D-LT
# ----------------------------------------------------------------------------
MNIST1D_KEYS = ('x', 'y', 'x_test', 'y_test')


def cache_dir() -> pathlib.Path:
  """Where generated data is kept between runs: ``$SSE_SAM_JAX_CACHE``, else
  ``$XDG_CACHE_HOME/sse_sam_jax``, else ``~/.cache/sse_sam_jax``."""
  if os.environ.get('SSE_SAM_JAX_CACHE'):
    return pathlib.Path(os.environ['SSE_SAM_JAX_CACHE'])
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'sse_sam_jax'


@functools.lru_cache(maxsize=2)
def _mnist1d_raw(num_samples: int, seed: int, iid_noise_scale: float) -> dict:
  """The generated MNIST-1D arrays (procedural, no download), cached per process and on
  disk (:func:`cache_dir`): generating the benchmark's 62,500 samples takes 25-40 s,
  loading them well under a second. A cache file that does not load is regenerated;
  one that cannot be written is skipped."""
  from importlib.metadata import version
  path = cache_dir() / (f'mnist1d-{version("mnist1d")}-n{num_samples}-seed{seed}-'
                        f'noise{float(iid_noise_scale)!r}.npz')
  raw = None
  if path.exists():
    try:
      with np.load(path) as f:
        raw = {k: f[k] for k in MNIST1D_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      raw = None  # damaged (an interrupted copy, a full disk): generate it again
  if raw is None:
    from mnist1d.data import get_dataset_args, make_dataset  # 1.3 s of imports (scipy)
    args = get_dataset_args()
    args.num_samples, args.seed, args.iid_noise_scale = num_samples, seed, iid_noise_scale  # pyright: ignore[reportAttributeAccessIssue]
    raw = {k: np.asarray(v) for k, v in make_dataset(args).items() if k in MNIST1D_KEYS}
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp.npz')
      np.savez(tmp, **raw)
      tmp.replace(path)  # atomic: a reader sees the whole file or none
    except OSError as e:
      logging.getLogger(__name__).warning(
          'MNIST-1D cache: cannot write %s (%s); every run generates the data again (~1 '
          'minute). Point SSE_SAM_JAX_CACHE at a writable folder.', path, e.strerror or e)
  for v in raw.values():
    v.setflags(write=False)
  return raw


def mnist1d_long_tail(*, iid_noise_scale: float = 0.07, imbalance_factor: float = 100.0,
                      num_samples: int = 62500, seed: int = 42, n_max: int = 5000,
                      selection_seed: int = 0, val_fraction: float = 0.0,
                      val_generated: int = 0, val_seed: int = 43,
                      standardize: bool = True, dtype=np.float32) -> LongTailData:
  """MNIST-1D generated offline (``mnist1d.data.make_dataset``), made long-tailed.

  Defaults are the offline benchmark (setting B of ``shared/offline_benchmark.md``):
  62,500 samples with seed 42 (50,000 train / 12,500 test, length 40), the
  LDAM-DRW profile with IF 100 and ``n_max`` 5000 (12,406 train examples),
  inputs standardised by the scalar mean/std of the long-tailed train set.
  ``dtype``: of the inputs, which are standardised in it (float64 for float64 replays
  of a reference). ``iid_noise_scale=0.02`` is setting A (saturated). ``val_fraction`` holds out a
  validation split from the long-tailed train set (default 0: as the reference).

  ``val_generated > 0`` instead draws a large, balanced validation split from the same
  generator with another seed (``val_seed``): ``val_generated`` new examples (train and
  test parts of that draw together; about a tenth per class), standardised like the
  others. The examples the long-tailed selection leaves unused cannot serve: the head
  class keeps almost all of its own (14 of 5,014 at the defaults are left).
  """
  if val_generated and val_fraction:
    raise ValueError('val_generated and val_fraction both set: choose one validation split.')
  if val_generated and val_seed == seed:
    raise ValueError(f'val_seed {val_seed} equals the data seed: the validation split would '
                     'repeat the training examples.')
  raw = _mnist1d_raw(num_samples, seed, iid_noise_scale)
  train = Split(raw['x'].astype(dtype), raw['y'], 10, 'mnist1d')
  test = Split(raw['x_test'].astype(dtype), raw['y_test'], 10, 'mnist1d-test')
  train = make_long_tailed(train, imbalance_factor, seed=selection_seed, n_max=n_max)
  train, val = hold_out(train, val_fraction, selection_seed)
  if val_generated:
    extra = _mnist1d_raw(int(val_generated), val_seed, iid_noise_scale)
    val = Split(np.concatenate([extra['x'], extra['x_test']]).astype(dtype),
                np.concatenate([extra['y'], extra['y_test']]), 10, 'mnist1d-val')
  if standardize:
    mean, std = float(train.x.mean()), float(train.x.std())
    for s in (train, test, val):
      if s is not None:
        s.x = ((s.x - mean) / std).astype(dtype)
  return LongTailData(train, test, val, 'mnist1d')
