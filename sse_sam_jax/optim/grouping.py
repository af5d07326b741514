"""Head/tail grouping of classes and examples.

A class is **tail** when it has fewer than ``eta`` training examples; all other
classes are **head**. Group methods take a per-example group id (head = 0,
tail = 1), built from labels with :func:`example_groups`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

HEAD = 0
TAIL = 1


def validate_class_counts(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """Returns class counts as an int array; raises on empty, zero or negative."""
  counts = np.asarray(class_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(
        f'class_counts must be a non-empty 1-D sequence, got shape {counts.shape}.')
  if not np.issubdtype(counts.dtype, np.integer):
    if not np.all(np.equal(np.mod(counts, 1), 0)):
      raise ValueError(f'class_counts must be integers, got {counts.tolist()}.')
    counts = counts.astype(np.int64)
  bad = np.flatnonzero(counts <= 0)
  if bad.size:
    raise ValueError(
        f'class_counts must be positive for every class; classes {bad.tolist()} '
        f'have counts {counts[bad].tolist()}. Drop empty classes or fix the counts.')
  return counts


def tail_classes(class_counts: Sequence[int] | np.ndarray, eta: float) -> np.ndarray:
  """Boolean mask over classes, True where the class is tail (``n_c < eta``).

  Args:
    class_counts: number of **training** examples of each class.
    eta: threshold; a class with fewer than ``eta`` examples is tail.

  Returns:
    ``np.ndarray`` of bool, shape ``[num_classes]``.

  Example:
    >>> tail_classes([500, 200, 80, 30, 12], eta=50).tolist()
    [False, False, False, True, True]
  """
  if not np.isscalar(eta) or not eta > 0:
    raise ValueError(f'eta must be a positive number, got {eta!r}.')
  counts = validate_class_counts(class_counts)
  return counts < eta


def example_groups(labels: jnp.ndarray, is_tail_class) -> jnp.ndarray:
  """Per-example group ids (0 = head, 1 = tail) from integer labels.

  Args:
    labels: int array ``[B]``.
    is_tail_class: bool array ``[num_classes]`` from :func:`tail_classes`.

  Returns:
    int32 array ``[B]``.
  """
  is_tail_class = jnp.asarray(is_tail_class, dtype=jnp.int32)
  return is_tail_class[labels]
