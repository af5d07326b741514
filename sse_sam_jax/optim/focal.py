r"""Focal-SAM (Li et al., 2025, `arXiv:2505.01660 <https://arxiv.org/abs/2505.01660>`_):
class-weighted sharpness in one perturbed pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sse_sam_jax.optim import composition, sharpness_reuse
from sse_sam_jax.optim import sharpness_aware as core
from sse_sam_jax.optim.grouping import class_lookup, validate_labels
from sse_sam_jax.optim.sharpness_aware import (
  Radius,
  SharpnessSteps,
  perturb,
  resolve_mask,
  validate_radius,
)


def focal_weights(class_counts, gamma: float) -> np.ndarray:
  r"""Focal-SAM's class weights :math:`(1 - \pi_c)^\gamma`, :math:`\pi_c` the class's
  share of the training set: rarer classes weigh more."""
  counts = np.asarray(class_counts, np.float64)
  if counts.ndim != 1 or counts.size < 1 or np.any(counts <= 0) or not np.all(np.isfinite(counts)):
    raise ValueError('class_counts must be positive training-set sizes, one per class.')
  if not np.isfinite(gamma) or gamma < 0:
    raise ValueError(f'gamma must be finite and >= 0, got {gamma}.')
  return (1.0 - counts / counts.sum()) ** float(gamma)


def focal_sam(rho: Radius, *, lam: float, gamma: float, class_counts, mask=None,
              adaptive_eta: float | None = None,
              sharpness_steps: SharpnessSteps | None = None,
              ) -> optax.GradientTransformationExtraArgs:
  r"""Focal-SAM (Li et al., ICML 2025, `arXiv:2505.01660 <https://arxiv.org/abs/2505.01660>`_,
  Algorithm 1): class-wise sharpness weighted by
  :math:`(1 - \pi_c)^\gamma`, at the cost of one perturbed pass.

  With :math:`L = \tfrac1B\sum_i l_i` and the focal loss
  :math:`L^\gamma = \tfrac1B\sum_i (1 - \pi_{y_i})^\gamma l_i` (the class-wise losses
  :math:`L^c` batch-normalised, so that :math:`\sum_c L^c = L`),

  .. math::
    \hat\epsilon = \rho\, \nabla L^\gamma(w) / \lVert \nabla L^\gamma(w) \rVert, \quad
    g = \nabla L(w) - \lambda \nabla L^\gamma(w) + \lambda \nabla L^\gamma(w + \hat\epsilon),

  the first-order form of :math:`L(w) + \lambda \sum_c (1-\pi_c)^\gamma
  [\max_{\lVert\epsilon\rVert\le\rho} L^c(w+\epsilon) - L^c(w)]` with one shared
  perturbation. ``gamma = 0`` and ``lam = 1`` is SAM. A per-class radius would need
  one perturbed pass per class (CC-SAM); this is the one-pass alternative.

  Passes: one clean forward, two backwards, one perturbed forward+backward (8 units,
  2.7x SGD; ImbSAM's cost). ``update`` needs ``params``, ``loss_fn`` and
  ``labels``. We could not read the paper's default ``lam``/``gamma`` here; they
  are required arguments.

  Example:
    >>> import optax, sse_sam_jax as ssj
    >>> tx = optax.chain(ssj.focal_sam(0.05, lam=1.0, gamma=1.0, class_counts=[500, 50, 5]),
    ...                  optax.sgd(0.1))
  """
  rho = validate_radius(rho)
  if not np.isfinite(lam) or lam < 0:
    raise ValueError(f'lam must be finite and >= 0, got {lam}.')
  weights = focal_weights(class_counts, gamma)  # float64: cast to the losses' dtype
  adaptive_eta = core._check_adaptive_eta(adaptive_eta)
  sharpness_steps = sharpness_reuse.validate(sharpness_steps)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_vjp=None, labels=None,
                sharpness_step=None, perturbed_aux=None, **extra_args):
    del updates, extra_args
    composition.check_composition('focal_sam', params)
    core._require('focal_sam', params=params, loss_fn=loss_fn, labels=labels)
    core._check_aux_sink(perturbed_aux, 'focal_sam')
    labels = validate_labels(labels, len(weights), 'focal_sam')
    if loss_vjp is None:
      losses, vjp_fn = core._loss_vjp(loss_fn, params, [] if perturbed_aux is not None else None)
    else:
      losses, vjp_fn = loss_vjp
    core._check_losses(losses, labels.shape[0])
    n = labels.shape[0]
    plain = jnp.full_like(losses, 1.0 / n)  # (full_like: the losses' sharding too)
    focal = class_lookup(weights, labels, losses.dtype) / n

    def clean_fn():
      return core._cast_like(vjp_fn(plain)[0], params)

    def full_fn():
      clean = clean_fn()
      if core._is_static_zero(rho) or lam == 0:
        return clean, None, clean
      grad_focal = vjp_fn(focal)[0]
      perturbed = perturb(params, grad_focal, core._radius_at(rho, state.count),
                          resolve_mask(mask, params), adaptive_eta)
      grad_at, finite = core._vjp(loss_fn, perturbed, focal, perturbed_aux)
      direction = jax.tree.map(lambda g, f, p: g + lam * (p.astype(g.dtype) - f.astype(g.dtype)),
                               clean, grad_focal, grad_at)
      return core._cast_like(direction, params), finite, clean

    return core._finish_step(sharpness_steps, state, full_fn, clean_fn,
                             sharpness_step=sharpness_step, perturbed_aux=perturbed_aux,
                             name='focal_sam')

  return core._transformation(update_fn, sharpness_steps)
