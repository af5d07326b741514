"""Class statistics every long-tailed consumer needs."""

from __future__ import annotations

import dataclasses

import numpy as np

from sse_sam_jax.data.sources import short_list
from sse_sam_jax.optim.grouping import tail_classes, validate_class_counts

# (many_above, few_below): Many > many_above, Few < few_below, Medium in between.
SHOT_THRESHOLDS = {'default': (100, 20), 'cifar10': (1000, 200), 'mnist1d': (1000, 200)}


@dataclasses.dataclass(frozen=True)
class ClassStats:
  """Training-set class counts and the groups derived from them."""
  counts: np.ndarray
  many_above: int = 100
  few_below: int = 20

  @classmethod
  def from_labels(cls, labels, num_classes: int, **kw) -> ClassStats:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f'labels must lie in [0, {num_classes}); found '
                       f'{labels.min()}..{labels.max()}.')
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      raise ValueError(f'classes {short_list(empty.tolist())} ({empty.size} of {len(counts)}) '
                       'have no training example.')
    return cls(counts=counts, **kw)

  def __post_init__(self):
    object.__setattr__(self, 'counts', validate_class_counts(self.counts))

  @property
  def num_classes(self) -> int:
    return len(self.counts)

  def tail_classes(self, eta: float) -> np.ndarray:
    return tail_classes(self.counts, eta)

  def class_groups(self, eta: float) -> np.ndarray:
    """Head 0 / tail 1 per class; raises if ``eta`` leaves no head or no tail class."""
    tail = self.tail_classes(eta)
    if tail.all() or not tail.any():
      raise ValueError(
          f'eta={eta} leaves {"no head" if tail.all() else "no tail"} class '
          f'(class counts range {self.counts.min()}..{self.counts.max()}).')
    return tail.astype(np.int32)

  def shot_groups(self) -> dict[str, np.ndarray]:
    """Boolean class masks for Many / Medium / Few."""
    many = self.counts > self.many_above
    few = self.counts < self.few_below
    return {'many': many, 'medium': ~many & ~few, 'few': few}
