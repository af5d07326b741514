r"""Group-wise SAM and ImbSAM (Zhou et al., 2023,
`arXiv:2308.07815 <https://arxiv.org/abs/2308.07815>`_): one perturbation
per group of examples (head, tail, or any grouping), one shared clean pass."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sse_sam_jax.optim import composition, sharpness_reuse
from sse_sam_jax.optim import sharpness_aware as core
from sse_sam_jax.optim.grouping import class_lookup, validate_labels
from sse_sam_jax.optim.sharpness_aware import (
  NORMALIZATIONS,
  Radius,
  SharpnessSteps,
  concrete_value,
  perturb,
  resolve_mask,
  validate_radius,
)


def group_coefficients(group_ids: jax.Array, num_groups: int, normalization: str,
                       group_weights: jax.typing.ArrayLike | Sequence[float],
                       dtype=jnp.float32) -> jax.Array:
  """Per-example weights ``[num_groups, B]`` such that ``L_k = coeffs[k] @ losses``.

  ``'batch'`` divides by the batch size, ``'group'`` by the group's size in the
  batch; an empty group gets all-zero weights.
  """
  batch = group_ids.shape[0]
  onehot = (group_ids[None, :] == jnp.arange(num_groups)[:, None]).astype(dtype)
  weights = jnp.asarray(group_weights, dtype)[:, None]
  if normalization == 'batch':
    return onehot * weights / batch
  sizes = jnp.sum(onehot, axis=1, keepdims=True)
  return onehot * weights / jnp.where(sizes > 0, sizes, 1)


def group_sam(rhos: Sequence[Radius], *, normalization: str = 'batch',
              group_weights: Sequence[float] | None = None,
              class_groups: Sequence[int] | np.ndarray | None = None,
              mask=None, adaptive_eta: float | None = None,
              sharpness_steps: SharpnessSteps | None = None, name: str = 'group_sam',
              ) -> optax.GradientTransformationExtraArgs:
  r"""Group-wise SAM: every group of examples is perturbed with its own radius.

  .. math::
    g = \sum_k \nabla L_k\big(w + \rho_k\, \nabla L_k(w) / \lVert \nabla L_k(w) \rVert\big).

  All group gradients at :math:`w` come from **one** forward pass (one
  backward per group); a group with the constant radius ``0.0`` contributes
  its clean gradient and costs no further pass. The incoming ``updates`` are
  not read (only replaced), so a caller that passes ``loss_vjp`` need not
  compute the plain gradient at all.

  Args:
    rhos: one radius per group (float or optax schedule).
    normalization: ``'batch'`` (divide group sums by the batch size; the
      default, as in the SSE-SAM and ImbSAM papers' code) or ``'group'``
      (divide by the group's size in the batch).
    group_weights: a multiplier per group (default all 1).
    class_groups: optional int ``[num_classes]`` giving each class's group, so
      that ``update`` may be called with ``labels`` instead of ``group_ids``.
    mask: optional pytree of bools (or callable ``params -> bools``): perturb
      only these parameters, for every group (see the module docs).
    adaptive_eta: ASAM's :math:`\eta` for every group's ascent step (see
      :func:`perturb`); ``None``: SAM's.
    sharpness_steps: perturbed passes on some steps only (LookSAM reuse of the
      summed direction's sharpness component; see
      :mod:`sse_sam_jax.optim.sharpness_reuse`). A reuse step costs one clean
      forward and one backward pass.
    name: the name used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``,
    ``loss_fn`` and ``group_ids`` (or ``labels``); ``loss_vjp`` is optional.
  {extra}"""
  rhos = tuple(validate_radius(r, f'rhos[{i}]') for i, r in enumerate(rhos))
  num_groups = len(rhos)
  if num_groups == 0:
    raise ValueError('group_sam needs at least one group radius.')
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}.')
  if group_weights is None:
    group_weights = (1.0,) * num_groups
  group_weights = tuple(_check_weight(w, i) for i, w in enumerate(group_weights))
  if len(group_weights) != num_groups:
    raise ValueError(
        f'group_weights must be {num_groups} finite non-negative numbers, got {group_weights}.')
  if class_groups is not None:
    class_groups = _check_class_groups(class_groups, num_groups)

  adaptive_eta = core._check_adaptive_eta(adaptive_eta)
  sharpness_steps = sharpness_reuse.validate(sharpness_steps)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_vjp=None,
                group_ids=None, labels=None, sharpness_step=None, perturbed_aux=None,
                **extra_args):
    del updates, extra_args
    composition.check_composition(name, params)
    if group_ids is None and class_groups is not None:  # built with tail_classes: labels
      core._require(name, params=params, loss_fn=loss_fn, labels=labels)
      labels = validate_labels(labels, len(class_groups), name)
      group_ids = class_lookup(class_groups, labels, jnp.int32)
    core._require(name, params=params, loss_fn=loss_fn, group_ids=group_ids)
    core._check_aux_sink(perturbed_aux, name)
    group_ids = jnp.asarray(group_ids)
    if group_ids.ndim != 1:
      raise ValueError(f'group_ids must have shape [B], got {group_ids.shape}.')
    if loss_vjp is None:
      losses, vjp_fn = core._loss_vjp(loss_fn, params, [] if perturbed_aux is not None else None)
    else:
      losses, vjp_fn = loss_vjp
    core._check_losses(losses, group_ids.shape[0])
    coeffs = group_coefficients(group_ids, num_groups, normalization, group_weights,
                                jnp.result_type(jnp.float32, losses.dtype))
    coeffs = coeffs.astype(losses.dtype)
    full_mask = resolve_mask(mask, params)

    def full_fn():
      direction, finite, clean = None, None, None
      for k, rho in enumerate(rhos):
        grad_k = vjp_fn(coeffs[k])[0]
        if sharpness_steps is not None:
          clean = grad_k if clean is None else jax.tree.map(jnp.add, clean, grad_k)
        if not core._is_static_zero(rho):
          perturbed = perturb(params, grad_k, core._radius_at(rho, state.count), full_mask,
                              adaptive_eta)
          grad_k, finite_k = core._vjp(loss_fn, perturbed, coeffs[k], perturbed_aux)
          finite = finite_k if finite is None else jnp.logical_and(finite, finite_k)
        direction = grad_k if direction is None else jax.tree.map(jnp.add, direction, grad_k)
      clean = None if clean is None else core._cast_like(clean, params)
      return core._cast_like(direction, params), finite, clean

    def clean_fn():  # the clean gradient of sum_k L_k: one backward pass
      return core._cast_like(vjp_fn(jnp.sum(coeffs, axis=0))[0], params)

    return core._finish_step(sharpness_steps, state, full_fn, clean_fn,
                             sharpness_step=sharpness_step, perturbed_aux=perturbed_aux,
                             name=name)

  return core._transformation(update_fn, sharpness_steps)


group_sam.__doc__ = (group_sam.__doc__ or '').replace('{extra}', core._EXTRA_ARGS_DOC)


def _check_weight(weight, index):
  value = concrete_value(weight)
  if value is None:
    return weight  # traced (optax.inject_hyperparams inside jit)
  if value.shape != () or not np.isfinite(value) or value < 0:
    raise ValueError(f'group weight {index} must be a finite number >= 0, got {weight!r}.')
  return float(value) if not isinstance(weight, jax.Array) else weight


def _check_class_groups(class_groups, num_groups):
  values = concrete_value(class_groups)
  if values is None:
    raise TypeError(
        'class groups / tail_classes must be concrete (NumPy or Python) values, not traced. '
        'Under optax.inject_hyperparams, list them in static_args, e.g. '
        "optax.inject_hyperparams(ssj.sse_sam, static_args=('switch_step', 'tail_classes')).")
  values = np.asarray(values)
  if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool) \
      or np.any((values < 0) | (values >= num_groups)):
    raise ValueError(f'class_groups must map each class to a group in [0, {num_groups}).')
  return values.astype(np.int32)


def _head_tail_class_groups(tail_classes):
  if tail_classes is None:
    return None
  values = concrete_value(tail_classes)
  if values is None:
    _check_class_groups(tail_classes, 2)  # raises: traced
  tail_classes = np.asarray(values)
  if tail_classes.dtype != bool:
    raise TypeError('tail_classes must be a boolean mask over classes '
                    '(see sse_sam_jax.optim.tail_classes).')
  return tail_classes.astype(np.int32)


def imbsam(rho: Radius, *, normalization: str = 'batch', tail_weight: float = 1.0,
           tail_classes=None, mask=None, adaptive_eta: float | None = None,
           sharpness_steps: SharpnessSteps | None = None,
           ) -> optax.GradientTransformationExtraArgs:
  r"""ImbSAM (Zhou et al., ICCV 2023, `arXiv:2308.07815
  <https://arxiv.org/abs/2308.07815>`_): only the tail group is perturbed.

  .. math::
    g = \nabla L_H(w) + \nabla L_T\big(w + \rho\, \nabla L_T(w) / \lVert \nabla L_T(w) \rVert\big).

  ``group_ids`` marks head examples 0 and tail examples 1 (or pass ``labels``
  and build with ``tail_classes``). Defaults follow the paper (batch
  normalization, tail weight 1). The baseline inside the SSE-SAM repository is
  ``normalization='group'``; the ImbSAM repository's current code is
  ``tail_weight=2.0``. ``mask``, ``adaptive_eta`` (ASAM) and ``sharpness_steps``
  (LookSAM-style reuse) as in :func:`group_sam`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sse_sam_jax as ssj
    >>> tail = ssj.tail_classes([500, 200, 30], eta=50)   # class 2 is tail
    >>> tx = optax.chain(ssj.imbsam(0.1, tail_classes=tail), optax.sgd(0.1))
    >>> x, y = jnp.eye(3), jnp.array([0, 1, 2])
    >>> w = jnp.zeros((3, 3))
    >>> loss_fn = lambda w: -jax.nn.log_softmax(x @ w)[jnp.arange(3), y]
    >>> state = tx.init(w)
    >>> updates, state = tx.update(w, state, w, loss_fn=loss_fn, labels=y)
  """
  return group_sam((0.0, rho), normalization=normalization,
                   group_weights=(1.0, tail_weight),
                   class_groups=_head_tail_class_groups(tail_classes), mask=mask,
                   adaptive_eta=adaptive_eta, sharpness_steps=sharpness_steps, name='imbsam')
