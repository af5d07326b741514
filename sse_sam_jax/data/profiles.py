"""Imbalance profiles and long-tailed subsampling of a balanced training set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROFILES = ('exp', 'step')
SELECTIONS = ('shuffle', 'first')


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float,
                     profile: str = 'exp') -> list[int]:
  """Per-class training counts of a long-tailed profile.

  ``'exp'`` (LDAM-DRW): class ``i`` keeps ``int(n_max * (1/IF) ** (i / (C - 1)))``.
  ``'step'``: the first half keeps ``n_max``, the rest ``int(n_max / IF)``.

  >>> long_tail_counts(5000, 10, 100)
  [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  """
  if not imbalance_factor >= 1:
    raise ValueError(f'imbalance factor must be >= 1, got {imbalance_factor}.')
  if num_classes < 1 or n_max < 1:
    raise ValueError(f'need num_classes >= 1 and n_max >= 1, got {num_classes}, {n_max}.')
  if profile == 'exp':
    if num_classes == 1:
      return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0)))
            for i in range(num_classes)]
  if profile == 'step':
    half = num_classes // 2
    return [int(n_max)] * half + [int(n_max / imbalance_factor)] * (num_classes - half)
  raise ValueError(f'unknown imbalance profile {profile!r}; choose one of {PROFILES}.')


def select_long_tail(labels: np.ndarray, counts: Sequence[int], *, selection: str = 'shuffle',
                     seed: int = 0) -> np.ndarray:
  """Indices of a long-tailed subset keeping ``counts[c]`` examples of class ``c``.

  ``'shuffle'`` (LDAM-DRW): ``np.random.seed(seed)`` once, then for classes in
  order shuffle that class's indices and keep the first ``counts[c]``.
  ``'first'`` (the SSE-SAM code): the first ``counts[c]`` indices of each class.
  Returned indices are grouped by class, in that selection order.
  """
  labels = np.asarray(labels)
  if selection not in SELECTIONS:
    raise ValueError(f'unknown selection {selection!r}; choose one of {SELECTIONS}.')
  rng = np.random.RandomState(seed)
  out = []
  for c, n in enumerate(counts):
    idx = np.flatnonzero(labels == c)
    if n > len(idx):
      raise ValueError(f'class {c} has {len(idx)} examples, fewer than the {n} requested.')
    if n < 1:
      raise ValueError(f'class {c} would keep {n} examples; every class needs at least one.')
    if selection == 'shuffle':
      rng.shuffle(idx)
    out.append(idx[:n])
  return np.concatenate(out)
