r"""SAM (Foret et al., 2021, `arXiv:2010.01412 <https://arxiv.org/abs/2010.01412>`_) and
ASAM (Kwon et al., 2021, `arXiv:2102.11600 <https://arxiv.org/abs/2102.11600>`_): one
perturbation from the whole batch's gradient."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from sse_sam_jax.optim import composition, sharpness_reuse
from sse_sam_jax.optim import sharpness_aware as core
from sse_sam_jax.optim.sharpness_aware import (
  ASAM_ETA,
  Radius,
  SharpnessSteps,
  perturb,
  resolve_mask,
  validate_radius,
)


def sam(rho: Radius, *, mask=None, adaptive_eta: float | None = None,
        sharpness_steps: SharpnessSteps | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, `arXiv:2010.01412
  <https://arxiv.org/abs/2010.01412>`_).

  .. math::
    g = \nabla L\big(w + \rho\, \nabla L(w) / \lVert \nabla L(w) \rVert\big),
    \quad L = \tfrac1B \textstyle\sum_i l_i.

  The incoming ``updates`` are read as :math:`\nabla L(w)` (what
  ``jax.grad`` of the mean loss gives); with ``loss_vjp`` the clean gradient is
  taken from it instead. ``rho = 0.0`` returns the incoming gradient (plain SGD,
  no extra pass).

  Args:
    rho: radius, a float ``>= 0``, an optax schedule of the step count, or a
      scalar array (``optax.inject_hyperparams``).
    mask: optional pytree of bools (or callable ``params -> bools``): perturb
      only these parameters (see the module docs).
    adaptive_eta: ASAM (Kwon et al., 2021) with this :math:`\eta` (the paper's
      0.01, :data:`ASAM_ETA`; see :func:`perturb`); ``None``: SAM. ASAM's
      published radius is larger (0.5 with SGD on CIFAR): see :func:`asam`.
    sharpness_steps: run the perturbed pass on some steps only and reuse its
      sharpness component on the others (LookSAM; see
      :mod:`sse_sam_jax.optim.sharpness_reuse`); ``None``: every step exact.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ``loss_fn``.
  {extra}
  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sse_sam_jax as ssj
    >>> x, y = jnp.ones((4, 3)), jnp.array([0., 1., 2., 3.])
    >>> loss_fn = lambda w: (x @ w - y) ** 2        # per-example losses
    >>> w = jnp.zeros(3)
    >>> tx = optax.chain(ssj.sam(0.05), optax.sgd(0.1))
    >>> state = tx.init(w)
    >>> grads = jax.grad(lambda w: loss_fn(w).mean())(w)
    >>> updates, state = tx.update(grads, state, w, loss_fn=loss_fn)
    >>> w = optax.apply_updates(w, updates)
  """
  rho = validate_radius(rho)
  adaptive_eta = core._check_adaptive_eta(adaptive_eta)
  sharpness_steps = sharpness_reuse.validate(sharpness_steps)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_vjp=None,
                sharpness_step=None, perturbed_aux=None, **extra_args):
    del extra_args
    composition.check_composition('sam', params)
    if core._is_static_zero(rho):
      return updates, core._next_state(state)
    core._require('sam', params=params, loss_fn=loss_fn)
    core._check_aux_sink(perturbed_aux, 'sam')

    def clean_fn():
      if loss_vjp is None:
        return core._cast_like(updates, params)
      losses, vjp_fn = loss_vjp
      core._check_losses(losses)
      n = losses.shape[0]
      return core._cast_like(vjp_fn(jnp.full_like(losses, 1.0 / n))[0], params)

    def full_fn():
      clean = clean_fn()
      perturbed = perturb(params, clean, core._radius_at(rho, state.count),
                          resolve_mask(mask, params), adaptive_eta)
      losses_p, vjp_p = core._loss_vjp(loss_fn, perturbed, perturbed_aux)
      core._check_losses(losses_p)
      n = losses_p.shape[0]
      direction = vjp_p(jnp.full_like(losses_p, 1.0 / n))[0]
      return core._cast_like(direction, params), jnp.all(jnp.isfinite(losses_p)), clean

    return core._finish_step(sharpness_steps, state, full_fn, clean_fn,
                             sharpness_step=sharpness_step, perturbed_aux=perturbed_aux,
                             name='sam')

  return core._transformation(update_fn, sharpness_steps)


sam.__doc__ = (sam.__doc__ or '').replace('{extra}', core._EXTRA_ARGS_DOC)


def asam(rho: Radius = 0.5, *, eta: float = ASAM_ETA, mask=None,
         sharpness_steps: SharpnessSteps | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM (Kwon et al., ICML 2021, `arXiv:2102.11600
  <https://arxiv.org/abs/2102.11600>`_) with the paper's defaults (``rho=0.5``, ``eta=0.01``).

  :func:`sam` with ``adaptive_eta=eta``: the ascent step is
  :math:`\rho\, T_w^2 g / \lVert T_w g\rVert`, :math:`T_w = |w| + \eta` element-wise
  on kernels and scales, 1 on biases (the official code's rule).

  Example:
    >>> import optax, sse_sam_jax as ssj
    >>> tx = optax.chain(ssj.asam(), optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9))
  """
  return sam(rho, mask=mask, adaptive_eta=eta, sharpness_steps=sharpness_steps)
