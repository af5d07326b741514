r"""Per-example long-tail losses. Every loss returns one value per example ``[B]``.

The sharpness-aware optimizers build group losses as weighted sums of
per-example losses, so nothing here reduces over the batch, except where a
reference reduces by the sum of class weights (PyTorch's weighted
``cross_entropy``): then each example's value is rescaled so that their plain
mean equals the reference's weighted mean (``normalize_weights=True``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from sse_sam_jax.optim.grouping import validate_class_counts


def cross_entropy(logits, labels, class_weights=None, normalize_weights: bool = True):
  r"""Cross-entropy per example, optionally class-weighted.

  With weights :math:`w`, example :math:`i` gets :math:`w_{y_i} \ell_i \cdot B / \sum_j w_{y_j}`
  when ``normalize_weights`` (so the batch mean equals PyTorch's weighted mean), else
  :math:`w_{y_i} \ell_i`.

  >>> import jax.numpy as jnp
  >>> [round(v, 4) for v in cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3])).tolist()]
  [1.3863, 1.3863]
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return apply_class_weights(losses, labels, class_weights, normalize_weights)


def apply_class_weights(losses, labels, class_weights, normalize_weights: bool = True,
                        mask=None):
  """``w[labels] * losses``, normalised as :func:`cross_entropy` says; ``mask`` (bool
  ``[B]``): the batch is the examples where it is True (padding left out of the sums)."""
  if class_weights is None:
    return losses
  w = jnp.asarray(class_weights, losses.dtype)[labels]
  if normalize_weights:
    real = w if mask is None else w * mask  # (padding's weights out of the sum)
    n = losses.shape[0] if mask is None else jnp.sum(mask).astype(losses.dtype)
    return w * losses * (n / jnp.maximum(jnp.sum(real), 1e-12))
  return w * losses


def group_normalize(losses, group_ids, num_groups: int = 2, mask=None):
  r"""Rescales per-example losses so that their batch mean is the group-normalised loss.

  Example :math:`i` of group :math:`g` gets :math:`\ell_i \cdot B / n_g`, :math:`n_g` the
  group's size in the batch, so :math:`\frac1B\sum_i = \sum_g \frac{1}{n_g}\sum_{i\in g}
  \ell_i`: the loss ImbSAM's ``normalization='group'`` sums, here for any optimizer
  (plain SGD on it is ImbSAM with radius 0; SAM on it perturbs along its gradient).
  Every example's group is non-empty, so nothing divides by zero. ``mask`` (bool
  ``[B]``): the batch is the examples where it is True (padding: sizes and :math:`B`
  count the others only; a padded example's factor is finite).

  >>> import jax.numpy as jnp
  >>> group_normalize(jnp.array([1.0, 1.0, 1.0, 4.0]), jnp.array([0, 0, 0, 1])).tolist()
  [1.3333333730697632, 1.3333333730697632, 1.3333333730697632, 16.0]
  """
  onehot = group_ids[:, None] == jnp.arange(num_groups)[None, :]
  if mask is not None:
    onehot = onehot & mask[:, None]
  sizes = jnp.sum(onehot, axis=0).astype(losses.dtype)
  n = losses.shape[0] if mask is None else jnp.sum(mask).astype(losses.dtype)
  return losses * (n / jnp.maximum(sizes, 1)[group_ids])


def ldam_margins(class_counts, max_margin: float = 0.5) -> np.ndarray:
  """LDAM margins ``m_c ∝ n_c^{-1/4}``, the largest equal to ``max_margin``."""
  counts = validate_class_counts(class_counts).astype(np.float64)
  m = 1.0 / np.sqrt(np.sqrt(counts))
  return (m * (max_margin / np.max(m))).astype(np.float32)


def ldam(logits, labels, margins, scale: float = 30.0, class_weights=None,
         normalize_weights: bool = True):
  r"""LDAM (Cao et al., 2019): subtract the class margin from the true logit, scale, CE.

  Use with a normalised (cosine) classifier, as in the reference.
  """
  margins = jnp.asarray(margins, logits.dtype)
  onehot = jax_one_hot(labels, logits.shape[-1], logits.dtype)
  adjusted = logits - onehot * margins[labels][:, None]
  return cross_entropy(scale * adjusted, labels, class_weights, normalize_weights)


def jax_one_hot(labels, num_classes, dtype):
  return (labels[:, None] == jnp.arange(num_classes)[None, :]).astype(dtype)


def class_balanced_weights(class_counts, beta: float = 0.9999) -> np.ndarray:
  r"""DRW weights (Cui et al., 2019): :math:`(1-\beta)/(1-\beta^{n_c})`, summing to ``C``."""
  if not 0.0 <= beta < 1.0:
    raise ValueError(f'beta must lie in [0, 1), got {beta}.')
  counts = validate_class_counts(class_counts).astype(np.float64)
  w = (1.0 - beta) / (1.0 - np.power(beta, counts))
  return (w / w.sum() * len(counts)).astype(np.float32)


def log_prior(class_counts) -> np.ndarray:
  counts = validate_class_counts(class_counts).astype(np.float64)
  return np.log(counts / counts.sum()).astype(np.float32)


def logit_adjusted(logits, labels, class_counts, tau: float = 1.0, class_weights=None):
  r"""Logit-adjusted loss (Menon et al., 2021): CE of :math:`z + \tau \log \pi`."""
  adjusted = logits + tau * jnp.asarray(log_prior(class_counts), logits.dtype)
  return cross_entropy(adjusted, labels, class_weights)


def vector_scaling(logits, labels, class_counts, gamma: float = 0.2, tau: float = 1.0,
                   class_weights=None):
  r"""VS loss (Kini et al., 2021): CE of :math:`\Delta \odot z + \iota`,
  :math:`\Delta_c = (n_c / n_{max})^\gamma`, :math:`\iota_c = \tau \log \pi_c`."""
  counts = validate_class_counts(class_counts).astype(np.float64)
  delta = jnp.asarray((counts / counts.max()) ** gamma, logits.dtype)
  iota = tau * jnp.asarray(log_prior(counts), logits.dtype)
  return cross_entropy(logits * delta + iota, labels, class_weights)


LOSSES = ('ce', 'ldam', 'logit_adjusted', 'vs')

__all__ = [
    'cross_entropy',
    'apply_class_weights',
    'group_normalize',
    'ldam_margins',
    'ldam',
    'class_balanced_weights',
    'log_prior',
    'logit_adjusted',
    'vector_scaling',
]
