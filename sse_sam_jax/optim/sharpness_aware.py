r"""Sharpness-aware gradient transformations: SAM, group-wise SAM, ImbSAM.

Every transformation here is an :class:`optax.GradientTransformationExtraArgs`
that **replaces** the incoming gradient by a sharpness-aware direction; put it
first in a chain, before weight decay and the base optimizer (the references
add weight decay at the *unperturbed* weights and leave it out of the
perturbation)::

  tx = optax.chain(
      imbsam(rho=0.1),
      optax.add_decayed_weights(1e-3),
      optax.sgd(0.01, momentum=0.9),
  )

The loss reaches the transformations through keyword-only extra arguments of
``update``:

``loss_fn``
  ``params -> per-example losses [B]``. Called at perturbed parameters. For a
  model with BatchNorm it must run in training mode (statistics of the full
  batch) and discard the running-statistics update: the running statistics
  come from the clean pass, which the caller owns.
``loss_vjp`` (optional)
  ``(per_example_losses, vjp_fn)`` at the **unperturbed** ``params``: the first
  two outputs of ``jax.vjp(loss_fn, params)``. Passing it lets the caller share
  its own clean forward pass (and read its aux, e.g. BatchNorm statistics).
  Without it the transformation runs that forward pass itself.
``group_ids`` (group methods)
  int ``[B]``, the group of every example (head = 0, tail = 1 for ImbSAM and
  SSE-SAM). Alternatively ``labels`` when the transformation was built with
  ``tail_classes``/``class_groups``.

Group losses. With per-example losses :math:`l_i`, group :math:`k` and weight
:math:`w_k`,

.. math::
  L_k = w_k \sum_{i \in k} l_i / D_k, \qquad
  D_k = B \text{ (``normalization='batch'``, default) or } |k| \text{ (``'group'``)}.

An empty group has :math:`L_k = 0` and a zero gradient (never NaN).

Passes per step (forward = 1 unit, backward = 2, plain SGD = 3 units):

=========================  ================================  =====
method                     passes                            units
=========================  ================================  =====
``sam``                    clean fwd+bwd, perturbed fwd+bwd  6
``imbsam``                 clean fwd + 2 bwd, tail fwd+bwd   8
``group_sam`` (K groups)   clean fwd + K bwd, one fwd+bwd    3+2K+3·(#rho≠0)
                           per group whose rho is not 0
=========================  ================================  =====

A group whose radius is the constant ``0.0`` is never perturbed: its clean
gradient is used directly and no extra pass runs.

**Radii** are floats, optax schedules of the step count, or scalar arrays, so
``optax.inject_hyperparams(ssj.sam)(rho=0.05)`` makes them runtime values in the
optimizer state (a concrete value is still checked; a traced one cannot be).

**A subset of parameters.** ``mask=`` (a pytree of bools like ``params``, or a
callable ``params -> pytree of bools``, as in ``optax.masked``) perturbs only the
leaves marked ``True``: :math:`\hat g` is normalised over those leaves alone and
the others stay at :math:`w` in every perturbed pass (as SAM-ON perturbs only
the normalisation layers). The returned direction still covers every
parameter.

**Composition.** Put the transform first in its chain; see
:mod:`sse_sam_jax.optim.composition` for the compositions that are refused and
why, and the README's table for the recipes (clipping, ``apply_if_finite``,
``MultiSteps``, ``lookahead``, Flax ``TrainState`` and ``nnx.Optimizer``).

**State.** :class:`SharpnessAwareState` counts steps (for schedules) and the
steps on which a perturbed loss was not finite (``notfinite_count``): a loss
finite at :math:`w` and NaN at the perturbed point shows there, and an
``optax.apply_if_finite`` placed after the transform skips that update.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sse_sam_jax.optim import composition, sharpness_reuse
from sse_sam_jax.optim.sharpness_reuse import SharpnessReuseState, SharpnessSteps

Radius = float | optax.Schedule | jax.Array

NORMALIZATIONS = ('batch', 'group')
NORM_EPS = 1e-16


class SharpnessAwareState(NamedTuple):
  """State of the sharpness-aware transformations.

  Attributes:
    count: steps taken (the argument of radius schedules).
    notfinite_count: steps on which a loss at a perturbed point was NaN or Inf.
  """
  count: jax.Array
  notfinite_count: jax.Array


def _init_state(params):
  del params
  return SharpnessAwareState(count=jnp.zeros([], jnp.int32),
                             notfinite_count=jnp.zeros([], jnp.int32))


def _init_fn(sharpness_steps):
  if sharpness_steps is None:
    return _init_state

  def init(params):
    return SharpnessReuseState(count=jnp.zeros([], jnp.int32),
                               notfinite_count=jnp.zeros([], jnp.int32),
                               sharpness=jax.tree.map(jnp.zeros_like, params),
                               clean_norm=jnp.zeros([], jnp.float32))
  return init


def _next_state(state, finite=None, sharpness=None, clean_norm=None):
  notfinite = state.notfinite_count
  if finite is not None:
    notfinite = notfinite + jnp.logical_not(finite).astype(notfinite.dtype)
  count = optax.safe_increment(state.count)
  if isinstance(state, SharpnessReuseState):
    return SharpnessReuseState(count, notfinite,
                               state.sharpness if sharpness is None else sharpness,
                               state.clean_norm if clean_norm is None else clean_norm)
  return SharpnessAwareState(count, notfinite)


_TRACER_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                  jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError)


def concrete_value(x):
  """``x`` as a NumPy value, or ``None`` when it is traced (inside ``jit``)."""
  try:
    return np.asarray(x)
  except _TRACER_ERRORS:
    return None


def validate_radius(rho: Radius, name: str = 'rho') -> Radius:
  """Checks a radius: a float, an optax schedule, or a scalar array; finite and >= 0.

  A traced array (e.g. a radius held in ``optax.inject_hyperparams``' state
  inside ``jit``) cannot be checked and is passed through; its concrete value
  was checked when the state was built.
  """
  if callable(rho):
    value = float(np.asarray(rho(0)))
    if not np.isfinite(value) or value < 0:
      raise ValueError(f'{name} schedule must be finite and >= 0; {name}(0) = {value}.')
    return rho
  if isinstance(rho, (jax.Array, np.ndarray)):
    if rho.shape != () or not jnp.issubdtype(rho.dtype, jnp.floating) and not jnp.issubdtype(
        rho.dtype, jnp.integer):
      raise TypeError(f'{name} must be a real scalar, got an array of shape {rho.shape} '
                      f'and dtype {rho.dtype}.')
    value = concrete_value(rho)
    if value is not None and (not np.isfinite(value) or value < 0):
      raise ValueError(f'{name} must be finite and >= 0, got {value}.')
    return rho
  if not isinstance(rho, numbers.Real) or isinstance(rho, bool):
    raise TypeError(f'{name} must be a float, an optax schedule or a scalar array, '
                    f'got {rho!r}.')
  if not np.isfinite(rho) or rho < 0:
    raise ValueError(f'{name} must be finite and >= 0, got {rho}.')
  return float(rho)


def _is_static_zero(rho: Radius) -> bool:
  """A Python ``0.0`` radius: the perturbed pass is left out of the program."""
  return isinstance(rho, float) and rho == 0.0


def resolve_mask(mask, params):
  """``mask`` (pytree of bools, a prefix of ``params``, or a callable) as a full tree."""
  if mask is None:
    return None
  if callable(mask):
    mask = mask(params)
  try:
    return jax.tree_util.tree_map(
        lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        'mask must be a pytree of Python bools with the structure of params (or a prefix '
        f'of it), or a callable returning one: {e}') from None


def _radius_at(rho: Radius, count: jax.Array):
  return rho(count) if callable(rho) else rho


def _global_norm(tree) -> jax.Array:
  """L2 norm over all leaves, accumulated in at least float32."""
  leaves = jax.tree.leaves(tree)
  dtype = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves))


ASAM_ETA = 0.01  # Kwon et al. (2021): eta = 0.01 (with rho = 0.5 for SGD)


def adaptive_leaves(params):
  """Which leaves ASAM scales by :math:`|w| + \\eta`: every leaf but biases.

  The official ASAM code scales the parameters whose name contains ``weight``
  (convolution and linear kernels, normalisation scales) and leaves biases at
  scale 1. Here a leaf is unscaled when the last name in its path is ``'bias'``
  (Flax's name; a trailing ``value`` of an NNX variable is skipped); a leaf with no
  name (a bare array) is scaled.
  """
  def scaled(path, _):
    names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n not in ('value', 'raw_value')]
    return not names or names[-1] != 'bias'
  return jax.tree_util.tree_map_with_path(scaled, params)


def perturb(params, direction, rho, mask=None, adaptive_eta=None):
  r"""Returns :math:`w + \rho\, d / (\lVert d \rVert + 10^{-16})`, in the dtype of ``params``.

  A zero ``direction`` gives ``params`` back unchanged (never NaN). With
  ``mask`` (a full pytree of bools, see :func:`resolve_mask`) only the marked
  leaves move, and the norm is taken over them alone.

  With ``adaptive_eta`` (ASAM, Kwon et al. 2021, as the official code's ascent
  step), every leaf of :func:`adaptive_leaves` has the
  element-wise scale :math:`T_w = |w| + \eta` (1 for biases) and

  .. math::
    w + \rho\, T_w^2\, d / (\lVert T_w d \rVert + 10^{-16}).
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  dirs = treedef.flatten_up_to(direction)
  keep = [True] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
  if adaptive_eta is None:
    scales = [None] * len(leaves)
  else:  # T_w = |w| + eta on the leaves ASAM scales, in at least float32
    scales = [jnp.abs(p.astype(jnp.result_type(p, jnp.float32))) + adaptive_eta if s else None
              for p, s in zip(leaves, jax.tree_util.tree_leaves(adaptive_leaves(params)))]
  scaled = [d if t is None else d * t.astype(d.dtype) for d, t in zip(dirs, scales)]
  kept = [d for d, m in zip(scaled, keep) if m]
  norm = _global_norm(kept) if kept else jnp.zeros([], jnp.float32)
  scale = rho / (norm + NORM_EPS)

  def move(p, d, t, m):
    if not m:
      return p
    dtype = jnp.result_type(p, norm)
    step = d.astype(dtype) if t is None else d.astype(dtype) * jnp.square(t).astype(dtype)
    return (p + jnp.asarray(scale).astype(dtype) * step).astype(p.dtype)

  return treedef.unflatten([move(*args) for args in zip(leaves, dirs, scales, keep)])


def _require(name: str, **values: Any) -> None:
  missing = [k for k, v in values.items() if v is None]
  if missing:
    raise TypeError(
        f'{name}.update() needs the keyword argument(s) {", ".join(missing)}; '
        'see the sse_sam_jax.optim docs for what each means. A wrapper that does not '
        'forward extra arguments (e.g. optax.lookahead) needs them bound: '
        f'ssj.bind_extra_args(ssj.{name}(...), loss_fn=loss_fn, ...).')


def _loss_vjp(loss_fn, params, aux_sink=None):
  """``jax.vjp(loss_fn, params)``; with ``aux_sink`` (a list) ``loss_fn`` returns
  ``(losses, aux)`` and the aux is appended to it."""
  if aux_sink is None:
    return jax.vjp(loss_fn, params)
  losses, vjp_fn, aux = jax.vjp(loss_fn, params, has_aux=True)
  aux_sink.append(aux)
  return losses, vjp_fn


def _vjp(loss_fn, params, cotangent, aux_sink=None):
  """Gradient of ``cotangent @ loss_fn(params)``, and whether those losses were finite."""
  losses, vjp_fn = _loss_vjp(loss_fn, params, aux_sink)
  _check_losses(losses, cotangent.shape[0])
  finite = jnp.all(jnp.isfinite(losses))
  return vjp_fn(cotangent.astype(losses.dtype))[0], finite


def _check_aux_sink(perturbed_aux, name):
  if perturbed_aux is not None and not isinstance(perturbed_aux, list):
    raise TypeError(f'{name}: perturbed_aux must be a list (the aux of every perturbed '
                    f'pass is appended to it), got {type(perturbed_aux).__name__}.')


def _check_losses(losses, batch_size=None):
  if losses.ndim != 1:
    raise ValueError(
        f'loss_fn must return per-example losses of shape [B]; got shape {losses.shape}.')
  if batch_size is not None and losses.shape[0] != batch_size:
    raise ValueError(
        f'loss_fn returned {losses.shape[0]} losses but the batch has {batch_size} '
        'group ids.')


def _cast_like(tree, like):
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


_EXTRA_ARGS_DOC = """
  Three further keyword arguments of ``update``:

  * ``sharpness_step`` (with ``sharpness_steps``): ``True``/``False`` fixes
    the kind of step (see :mod:`sse_sam_jax.optim.sharpness_reuse`); ``None``
    lets the program choose from the count.
  * ``perturbed_aux``: a list; ``loss_fn`` then returns ``(losses, aux)`` and
    the aux of every perturbed pass is appended to it, in pass order (e.g.
    BatchNorm statistics of the last perturbed pass). Read it in the same
    trace, right after ``update``.
"""


def sam(rho: Radius, *, mask=None, adaptive_eta: float | None = None,
        sharpness_steps: SharpnessSteps | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (Foret et al., 2021).

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
  adaptive_eta = _check_adaptive_eta(adaptive_eta)
  sharpness_steps = sharpness_reuse.validate(sharpness_steps)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_vjp=None,
                sharpness_step=None, perturbed_aux=None, **extra_args):
    del extra_args
    composition.check_composition('sam', params)
    if _is_static_zero(rho):
      return updates, _next_state(state)
    _require('sam', params=params, loss_fn=loss_fn)
    _check_aux_sink(perturbed_aux, 'sam')

    def clean_fn():
      if loss_vjp is None:
        return _cast_like(updates, params)
      losses, vjp_fn = loss_vjp
      _check_losses(losses)
      n = losses.shape[0]
      return _cast_like(vjp_fn(jnp.full((n,), 1.0 / n, losses.dtype))[0], params)

    def full_fn():
      clean = clean_fn()
      perturbed = perturb(params, clean, _radius_at(rho, state.count),
                          resolve_mask(mask, params), adaptive_eta)
      losses_p, vjp_p = _loss_vjp(loss_fn, perturbed, perturbed_aux)
      _check_losses(losses_p)
      n = losses_p.shape[0]
      direction = vjp_p(jnp.full((n,), 1.0 / n, losses_p.dtype))[0]
      return _cast_like(direction, params), jnp.all(jnp.isfinite(losses_p)), clean

    direction, finite, sharpness, clean_norm = sharpness_reuse.step(
        sharpness_steps, state, full_fn, clean_fn, sharpness_step=sharpness_step,
        static_required=perturbed_aux is not None, name='sam')
    return direction, _next_state(state, finite, sharpness, clean_norm)

  update_fn.sharpness_steps = sharpness_steps  # read by sharpness_steps_of()
  return optax.GradientTransformationExtraArgs(_init_fn(sharpness_steps), update_fn)


sam.__doc__ = sam.__doc__.replace('{extra}', _EXTRA_ARGS_DOC)


def asam(rho: Radius = 0.5, *, eta: float = ASAM_ETA, mask=None,
         sharpness_steps: SharpnessSteps | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM (Kwon et al., 2021) with the paper's defaults (``rho=0.5``, ``eta=0.01``).

  :func:`sam` with ``adaptive_eta=eta``: the ascent step is
  :math:`\rho\, T_w^2 g / \lVert T_w g\rVert`, :math:`T_w = |w| + \eta` element-wise
  on kernels and scales, 1 on biases (the official code's rule).

  Example:
    >>> import optax, sse_sam_jax as ssj
    >>> tx = optax.chain(ssj.asam(), optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9))
  """
  return sam(rho, mask=mask, adaptive_eta=eta, sharpness_steps=sharpness_steps)


def _check_adaptive_eta(eta):
  if eta is None:
    return None
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not np.isfinite(eta) \
      or eta < 0:
    raise ValueError(f'adaptive_eta must be a finite float >= 0 (ASAM) or None, got {eta!r}.')
  return float(eta)


def sharpness_steps_of(transform) -> SharpnessSteps | None:
  """The :class:`SharpnessSteps` a transform was built with (``None``: every step exact)."""
  return getattr(transform.update, 'sharpness_steps', None)


def group_coefficients(group_ids: jax.Array, num_groups: int, normalization: str,
                       group_weights: jax.Array, dtype=jnp.float32) -> jax.Array:
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
              class_groups: Sequence[int] | None = None,
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

  adaptive_eta = _check_adaptive_eta(adaptive_eta)
  sharpness_steps = sharpness_reuse.validate(sharpness_steps)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_vjp=None,
                group_ids=None, labels=None, sharpness_step=None, perturbed_aux=None,
                **extra_args):
    del updates, extra_args
    composition.check_composition(name, params)
    if group_ids is None and labels is not None and class_groups is not None:
      group_ids = jnp.asarray(class_groups)[labels]
    _require(name, params=params, loss_fn=loss_fn, group_ids=group_ids)
    _check_aux_sink(perturbed_aux, name)
    group_ids = jnp.asarray(group_ids)
    if group_ids.ndim != 1:
      raise ValueError(f'group_ids must have shape [B], got {group_ids.shape}.')
    if loss_vjp is None:
      losses, vjp_fn = _loss_vjp(loss_fn, params, [] if perturbed_aux is not None else None)
    else:
      losses, vjp_fn = loss_vjp
    _check_losses(losses, group_ids.shape[0])
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
        if not _is_static_zero(rho):
          perturbed = perturb(params, grad_k, _radius_at(rho, state.count), full_mask,
                              adaptive_eta)
          grad_k, finite_k = _vjp(loss_fn, perturbed, coeffs[k], perturbed_aux)
          finite = finite_k if finite is None else jnp.logical_and(finite, finite_k)
        direction = grad_k if direction is None else jax.tree.map(jnp.add, direction, grad_k)
      clean = None if clean is None else _cast_like(clean, params)
      return _cast_like(direction, params), finite, clean

    def clean_fn():  # the clean gradient of sum_k L_k: one backward pass
      return _cast_like(vjp_fn(jnp.sum(coeffs, axis=0))[0], params)

    direction, finite, sharpness, clean_norm = sharpness_reuse.step(
        sharpness_steps, state, full_fn, clean_fn, sharpness_step=sharpness_step,
        static_required=perturbed_aux is not None, name=name)
    return direction, _next_state(state, finite, sharpness, clean_norm)

  update_fn.sharpness_steps = sharpness_steps
  return optax.GradientTransformationExtraArgs(_init_fn(sharpness_steps), update_fn)


group_sam.__doc__ = group_sam.__doc__.replace('{extra}', _EXTRA_ARGS_DOC)


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
  r"""ImbSAM (Zhou et al., 2023): only the tail group is perturbed.

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
  r"""Focal-SAM (Li et al., ICML 2025, Algorithm 1): class-wise sharpness weighted by
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
  weights = focal_weights(class_counts, gamma).astype(np.float32)
  adaptive_eta = _check_adaptive_eta(adaptive_eta)
  sharpness_steps = sharpness_reuse.validate(sharpness_steps)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_vjp=None, labels=None,
                sharpness_step=None, perturbed_aux=None, **extra_args):
    del updates, extra_args
    composition.check_composition('focal_sam', params)
    _require('focal_sam', params=params, loss_fn=loss_fn, labels=labels)
    _check_aux_sink(perturbed_aux, 'focal_sam')
    labels = jnp.asarray(labels)
    if loss_vjp is None:
      losses, vjp_fn = _loss_vjp(loss_fn, params, [] if perturbed_aux is not None else None)
    else:
      losses, vjp_fn = loss_vjp
    _check_losses(losses, labels.shape[0])
    n = labels.shape[0]
    plain = jnp.full((n,), 1.0 / n, losses.dtype)
    focal = (jnp.asarray(weights)[labels] / n).astype(losses.dtype)

    def clean_fn():
      return _cast_like(vjp_fn(plain)[0], params)

    def full_fn():
      clean = clean_fn()
      if _is_static_zero(rho) or lam == 0:
        return clean, None, clean
      grad_focal = vjp_fn(focal)[0]
      perturbed = perturb(params, grad_focal, _radius_at(rho, state.count),
                          resolve_mask(mask, params), adaptive_eta)
      grad_at, finite = _vjp(loss_fn, perturbed, focal, perturbed_aux)
      direction = jax.tree.map(lambda g, f, p: g + lam * (p.astype(g.dtype) - f.astype(g.dtype)),
                               clean, grad_focal, grad_at)
      return _cast_like(direction, params), finite, clean

    direction, finite, sharpness, clean_norm = sharpness_reuse.step(
        sharpness_steps, state, full_fn, clean_fn, sharpness_step=sharpness_step,
        static_required=perturbed_aux is not None, name='focal_sam')
    return direction, _next_state(state, finite, sharpness, clean_norm)

  update_fn.sharpness_steps = sharpness_steps
  return optax.GradientTransformationExtraArgs(_init_fn(sharpness_steps), update_fn)


def mean_across(axis_name: str | tuple[str, ...]) -> optax.GradientTransformation:
  """Averages the updates over one or more mapped axes (``lax.pmean``).

  Put it right after a sharpness-aware transform inside ``shard_map`` for
  **per-device** perturbations (the original SAM's m-sharpness): every device
  perturbs from its own shard's gradient, then the directions are averaged once.
  Inside ``vmap(..., axis_name='microbatch')`` it averages per-microbatch
  directions; ``('data', 'microbatch')`` does both at once.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.lax.pmean(updates, axis_name), state

  return optax.GradientTransformation(init_fn, update_fn)
