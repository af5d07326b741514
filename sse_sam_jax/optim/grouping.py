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


def validate_labels(labels, num_classes: int, name: str):
  """``labels`` as an int array ``[B]`` of class indices, checked by name: integer dtype
  (not one-hot), rank 1, and, when concrete (outside ``jit``), each in
  ``[0, num_classes)``. A traced label cannot be checked; JAX's indexing would clamp an
  out-of-range one into the last class, so check the data where it is loaded."""
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'{name}: labels must be integer class indices of shape [B], got dtype '
                    f'{labels.dtype} and shape {labels.shape} (one-hot labels: pass '
                    'jnp.argmax(y, -1)).')
  if labels.ndim != 1:
    raise ValueError(f'{name}: labels must have shape [B], got {labels.shape}'
                     + (' (squeeze the last axis).' if labels.ndim == 2 and labels.shape[1] == 1
                        else '.'))
  try:
    values = np.asarray(labels)
  except Exception:  # pylint: disable=broad-except  (traced: nothing to check here)
    return labels
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f'{name}: labels must lie in [0, {num_classes}) (the classes the '
                     f'transform was built with); found {values.min()}..{values.max()}.')
  return labels


def class_lookup(table, labels, dtype=None) -> jnp.ndarray:
  """``table[labels]`` (a per-class value for every example) as a one-hot sum, not a
  gather: under a mesh with Explicit axes (``jax.make_mesh``'s default) a gather of a
  replicated table by batch-sharded labels has no sharding rule; this is elementwise."""
  table = jnp.asarray(table, dtype)
  onehot = labels[:, None] == jnp.arange(table.shape[0], dtype=labels.dtype)[None, :]
  return jnp.sum(jnp.where(onehot, table[None, :], jnp.zeros((), table.dtype)), axis=1)


def example_groups(labels: jnp.ndarray, is_tail_class) -> jnp.ndarray:
  """Per-example group ids (0 = head, 1 = tail) from integer labels.

  Args:
    labels: int array ``[B]``.
    is_tail_class: bool array ``[num_classes]`` from :func:`tail_classes`.

  Returns:
    int32 array ``[B]``.
  """
  return class_lookup(is_tail_class, jnp.asarray(labels), jnp.int32)
