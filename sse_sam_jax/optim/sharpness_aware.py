r"""What the sharpness-aware transformations share: their state, the conventions of
their extra arguments, radius and mask checks, and :func:`perturb`. The transforms
live one family per module: :mod:`~sse_sam_jax.optim.sam_and_asam` (SAM, ASAM),
:mod:`~sse_sam_jax.optim.group_methods` (group SAM, ImbSAM),
:mod:`~sse_sam_jax.optim.focal` (Focal-SAM), :mod:`~sse_sam_jax.optim.stage_switch` (SSE-SAM).

Every transformation is an :class:`optax.GradientTransformationExtraArgs`
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sse_sam_jax.optim import sharpness_reuse
from sse_sam_jax.optim.sharpness_reuse import SharpnessReuseState, SharpnessSteps
from sse_sam_jax.optim.tree_math import global_norm

Radius = float | optax.Schedule | jax.Array

NORMALIZATIONS = ('batch', 'group')
NORM_EPS = 1e-16


class SharpnessAwareState(NamedTuple):
  """State of the sharpness-aware transformations.

  Attributes:
    count: steps taken (the argument of radius schedules).
    notfinite_count: steps on which a loss at a perturbed point was NaN or Inf.
  """
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
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


def _all_devices(finite):
  """Inside ``jax.shard_map`` with ``check_vma=True`` a finiteness flag computed from a
  device's shard varies over the manual axes; the state must not: it becomes whether the
  losses were finite on every device (``pmin`` over those axes). Elsewhere (``jit``,
  ``check_vma=False``) it is returned as it is."""
  typeof = getattr(jax, 'typeof', None)
  aval = typeof(finite) if typeof is not None else None
  varying = getattr(aval, 'vma', None)  # (jax < 0.12: vma; 0.12: manual_axis_type.varying)
  if varying is None:
    varying = getattr(getattr(aval, 'manual_axis_type', None), 'varying', ())
  axes = tuple(sorted(varying or ()))
  if not axes:
    return finite
  return jax.lax.pmin(jnp.asarray(finite, jnp.int32), axes).astype(jnp.bool_)


def _next_state(state, finite=None, sharpness=None, clean_norm=None):
  notfinite = state.notfinite_count
  if finite is not None:
    finite = _all_devices(finite)
    notfinite = notfinite + jnp.logical_not(finite).astype(notfinite.dtype)
  count = jnp.asarray(optax.safe_increment(state.count))
  if isinstance(state, SharpnessReuseState):
    return SharpnessReuseState(count, notfinite,
                               state.sharpness if sharpness is None else sharpness,
                               state.clean_norm if clean_norm is None else clean_norm)
  return SharpnessAwareState(count, notfinite)


def _finish_step(sharpness_steps, state, full_fn, clean_fn, *, sharpness_step, perturbed_aux,
                 name: str):
  """The step's direction (exact, or reusing the stored sharpness: see
  :func:`sse_sam_jax.optim.sharpness_reuse.step`) and the next state."""
  direction, finite, sharpness, clean_norm = sharpness_reuse.step(
      sharpness_steps, state, full_fn, clean_fn, sharpness_step=sharpness_step,
      static_required=perturbed_aux is not None, name=name)
  return direction, _next_state(state, finite, sharpness, clean_norm)


def _transformation(update_fn, sharpness_steps) -> optax.GradientTransformationExtraArgs:
  """The transform of ``update_fn``; :func:`sharpness_steps_of` reads its schedule back."""
  update_fn.sharpness_steps = sharpness_steps  # pyright: ignore[reportFunctionMemberAccess]
  return optax.GradientTransformationExtraArgs(_init_fn(sharpness_steps), update_fn)


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
  if any(jnp.iscomplexobj(p) for p in leaves):
    raise TypeError('sharpness-aware transforms take real parameters: the perturbation\'s '
                    'norm and direction are not defined here for complex leaves. Keep a '
                    'complex weight as two real arrays (real and imaginary parts).')
  dirs = treedef.flatten_up_to(direction)
  keep = [True] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
  if adaptive_eta is None:
    scales = [None] * len(leaves)
  else:  # T_w = |w| + eta on the leaves ASAM scales, in at least float32
    scales = [jnp.abs(p.astype(jnp.result_type(p, jnp.float32))) + adaptive_eta if s else None
              for p, s in zip(leaves, jax.tree_util.tree_leaves(adaptive_leaves(params)))]
  scaled = [d if t is None else d * t.astype(d.dtype) for d, t in zip(dirs, scales)]
  kept = [d for d, m in zip(scaled, keep) if m]
  norm = global_norm(kept) if kept else jnp.zeros([], jnp.float32)
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


def _check_adaptive_eta(eta):
  if eta is None:
    return None
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not np.isfinite(float(eta)) \
      or eta < 0:
    raise ValueError(f'adaptive_eta must be a finite float >= 0 (ASAM) or None, got {eta!r}.')
  return float(eta)


def sharpness_steps_of(transform) -> SharpnessSteps | None:
  """The :class:`SharpnessSteps` a transform was built with (``None``: every step exact)."""
  return getattr(transform.update, 'sharpness_steps', None)


