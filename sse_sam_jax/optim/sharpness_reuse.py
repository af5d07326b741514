r"""Cheaper sharpness-aware steps: run the perturbed passes on some steps only.

A :class:`SharpnessSteps` given to :func:`~sse_sam_jax.sam`,
:func:`~sse_sam_jax.group_sam`, :func:`~sse_sam_jax.imbsam` or
:func:`~sse_sam_jax.sse_sam` (``sharpness_steps=``) makes every step one of two
kinds:

* a **sharpness step** (the transform's exact rule, all its passes), on which the
  sharpness component of the direction is stored (LookSAM, Liu et al. 2022,
  `arXiv:2203.02714 <https://arxiv.org/abs/2203.02714>`_, Algorithm 1):

  .. math::
    g_v = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2}\, g,

  :math:`g_s` the sharpness-aware direction and :math:`g` the clean gradient of
  the same objective (for the group methods :math:`g = \sum_k \nabla L_k(w)`,
  :math:`g_s` the sum of the group directions);
* a **reuse step** (one forward and one backward pass, the cost of SGD):

  .. math::
    g_s \approx g + \alpha\, \frac{\lVert g\rVert}{\lVert g_v\rVert}\, g_v
    \quad (\texttt{scale='looksam'}), \qquad
    g_s \approx g + \alpha\, \frac{\lVert g\rVert}{\lVert g_0\rVert}\, g_v
    \quad (\texttt{scale='measured'}),

  with the :math:`g_v` of the last sharpness step (zero before the first one,
  which gives plain :math:`g`) and :math:`g_0` that step's clean gradient.
  LookSAM's rule gives the reused component the norm :math:`\alpha \lVert g\rVert`
  whatever its measured size; ``'measured'`` keeps the size it had relative to
  the gradient on the sharpness step (with ``alpha = 1``: the exact step's
  component, rescaled with the gradient). ``alpha = 0`` drops the reuse: the
  cheap steps are plain gradient steps (SAM "every k steps" / on a random fraction).

Which steps are sharpness steps: those whose count (the transform's own step
count; for a stage of :func:`~sse_sam_jax.stage_switch`, counted from the stage's
start) is a multiple of ``every`` and, when ``fraction < 1``, whose count also
hashes below ``fraction`` (a fixed integer hash of ``(count, seed)``, the same on
the host and in the program: the choice is reproducible and survives a resume).

Inside one program the two kinds are a ``lax.cond`` on the count (GPU/TPU: no
cost); called outside ``jit`` (a concrete count) the update picks on the host. A
caller that knows the count on the host passes ``sharpness_step=True`` or
``False`` to ``update`` and compiles one program per kind instead (the trainer
does so on CPU, where convolutions inside ``lax.cond`` are slow):
:func:`is_sharpness_step` gives the same answer as the program.

For the group methods the stored component is that of the **summed** direction,
so a reuse step costs one backward pass, not one per group.

Cost per step (SGD = 3 units): ``(C_exact + (every - 1) * 3) / every`` with
``fraction = 1``, ``fraction * C_exact + (1 - fraction) * 3`` with ``every = 1``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import core as jax_core

from sse_sam_jax.optim.tree_math import global_norm, tree_dot

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_EPS = 1e-16


class SharpnessSteps(NamedTuple):
  """Which steps run the perturbed passes, and how the others reuse them.

  Attributes:
    every: a sharpness step every ``every`` steps (LookSAM's ``k``; paper default 5).
    fraction: in ``(0, 1]``; below 1, a step that ``every`` selects is kept with
      this probability (a fixed hash of the count and ``seed``).
    alpha: LookSAM's weight of the reused sharpness component (paper default 0.7);
      0 gives plain gradient steps between sharpness steps.
    seed: the hash's seed (``fraction < 1`` only).
    scale: ``'looksam'`` (the paper's: the reused component's norm is ``alpha`` times
      the gradient's) or ``'measured'`` (the size measured on the sharpness step,
      relative to the gradient, times ``alpha``).
  """
  every: int = 5
  fraction: float = 1.0
  alpha: float = 0.7
  seed: int = 0
  scale: str = 'looksam'


SCALES = ('looksam', 'measured')


def looksam(every: int = 5, alpha: float = 0.7) -> SharpnessSteps:
  """LookSAM's schedule (Liu et al., CVPR 2022, `arXiv:2203.02714
  <https://arxiv.org/abs/2203.02714>`_): a sharpness step every ``every`` steps,
  the sharpness component reused with weight ``alpha`` in between."""
  return _validated(SharpnessSteps(every=every, fraction=1.0, alpha=alpha))


def random_fraction(fraction: float, *, alpha: float = 0.0, seed: int = 0,
                    scale: str = 'looksam') -> SharpnessSteps:
  """Sharpness steps on a random ``fraction`` of steps; plain gradient steps
  (``alpha = 0``) or reuse of the sharpness component (``alpha > 0``) on the others."""
  return _validated(SharpnessSteps(every=1, fraction=fraction, alpha=alpha, seed=seed,
                                   scale=scale))


def validate(steps: SharpnessSteps | None) -> SharpnessSteps | None:
  """Checks a :class:`SharpnessSteps`; ``None`` (every step exact) passes."""
  if steps is None:
    return None
  if not isinstance(steps, SharpnessSteps):
    raise TypeError(f'sharpness_steps must be a SharpnessSteps or None, got {steps!r}.')
  every, fraction, alpha, seed, scale = steps
  if isinstance(every, bool) or int(every) != every or every < 1:
    raise ValueError(f'sharpness_steps.every must be an integer >= 1, got {every!r}.')
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f'sharpness_steps.fraction must lie in (0, 1], got {fraction!r}.')
  if not 0.0 <= float(alpha) < float('inf'):
    raise ValueError(f'sharpness_steps.alpha must be finite and >= 0, got {alpha!r}.')
  if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed <= _MASK32:
    raise ValueError(f'sharpness_steps.seed must be an integer in [0, 2**32), got {seed!r}.')
  if scale not in SCALES:
    raise ValueError(f'sharpness_steps.scale must be one of {SCALES}, got {scale!r}.')
  return SharpnessSteps(int(every), float(fraction), float(alpha), int(seed), scale)


def _validated(steps: SharpnessSteps) -> SharpnessSteps:
  validate(steps)
  return steps


def always_exact(steps: SharpnessSteps | None) -> bool:
  return steps is None or (steps.every == 1 and steps.fraction >= 1.0)


def _threshold(fraction: float) -> int:
  return min(int(fraction * 2.0 ** 32), _MASK32)


def is_sharpness_step(count: int, steps: SharpnessSteps | None) -> bool:
  """Host-side: whether the transform's step ``count`` is a sharpness step."""
  count = int(count)
  if steps is None or always_exact(steps):
    return True
  if count % steps.every:
    return False
  if steps.fraction >= 1.0:
    return True
  x = (count * _GOLDEN + steps.seed) & _MASK32
  x ^= x >> 16
  x = (x * _M1) & _MASK32
  x ^= x >> 15
  x = (x * _M2) & _MASK32
  x ^= x >> 16
  return x < _threshold(steps.fraction)


def traced_is_sharpness_step(count: jax.Array, steps: SharpnessSteps) -> jax.Array:
  """In-program: the same answer as :func:`is_sharpness_step` (uint32 arithmetic)."""
  selected = count % steps.every == 0
  if steps.fraction >= 1.0:
    return selected
  u32 = jnp.uint32
  x = count.astype(u32) * u32(_GOLDEN) + u32(steps.seed)
  x = x ^ (x >> 16)
  x = x * u32(_M1)
  x = x ^ (x >> 15)
  x = x * u32(_M2)
  x = x ^ (x >> 16)
  return jnp.logical_and(selected, x < u32(_threshold(steps.fraction)))


class SharpnessReuseState(NamedTuple):
  """State of a sharpness-aware transform with ``sharpness_steps``.

  Attributes:
    count: steps taken (radius schedules and the choice of sharpness steps).
    notfinite_count: steps on which a loss at a perturbed point was NaN or Inf.
    sharpness: :math:`g_v` of the last sharpness step, like ``params``.
    clean_norm: the norm of that step's clean gradient (``scale='measured'``).
  """
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  notfinite_count: jax.Array
  sharpness: Any
  clean_norm: jax.Array


def sharpness_component(direction, clean):
  r""":math:`g_s - \langle g, g_s\rangle / \lVert g\rVert^2\, g` (zero ``g``: ``g_s``)."""
  coef = tree_dot(clean, direction) / (tree_dot(clean, clean) + _EPS)
  return jax.tree.map(lambda s, g: (s.astype(jnp.float32) - coef * g.astype(jnp.float32)
                                    ).astype(s.dtype), direction, clean)


def reused_direction(clean, sharpness, alpha: float, reference_norm=None):
  r""":math:`g + \alpha \lVert g\rVert / \lVert g_v\rVert\, g_v` (zero ``g_v``: ``g``); with
  ``reference_norm`` (``scale='measured'``) :math:`\lVert g_v\rVert` is replaced by it."""
  if alpha == 0.0:
    return clean
  denominator = global_norm(sharpness) if reference_norm is None else reference_norm
  coef = alpha * global_norm(clean) / (denominator + _EPS)
  return jax.tree.map(lambda g, v: (g.astype(jnp.float32) + coef * v.astype(jnp.float32)
                                    ).astype(g.dtype), clean, sharpness)


def step(steps: SharpnessSteps | None, state, full_fn, clean_fn, *, sharpness_step=None,
         static_required: bool = False, name: str = 'sam'):
  """One step of a transform: ``full_fn() -> (direction, finite, clean)`` runs the exact
  rule, ``clean_fn() -> clean`` the clean gradient alone. Returns ``(direction, the
  perturbed losses' finite flag or None, new sharpness, new clean norm)`` (the last two
  ``None`` without ``steps``).

  ``sharpness_step``: a Python bool fixes the kind (no ``lax.cond``); ``None``
  decides in the program. ``static_required`` (the caller collects the aux of the
  perturbed passes) refuses the in-program choice.
  """
  if steps is None:
    direction, finite, _ = full_fn()
    return direction, finite, None, None
  if sharpness_step is not None and not isinstance(sharpness_step, bool):
    raise TypeError(f'{name}: sharpness_step must be a Python bool or None, '
                    f'got {sharpness_step!r}.')
  if sharpness_step is None and always_exact(steps):
    sharpness_step = True

  def full():
    direction, finite, clean = full_fn()
    finite = jnp.asarray(True) if finite is None else finite
    return (direction, finite, sharpness_component(direction, clean),
            global_norm(clean).astype(state.clean_norm.dtype))

  def cheap():
    clean = clean_fn()
    reference = state.clean_norm if steps.scale == 'measured' else None
    return (reused_direction(clean, state.sharpness, steps.alpha, reference),
            jnp.asarray(True), state.sharpness, state.clean_norm)

  if sharpness_step is None and not isinstance(state.count, jax_core.Tracer):
    sharpness_step = is_sharpness_step(int(state.count), steps)  # called outside jit
  if sharpness_step is not None:
    return full() if sharpness_step else cheap()
  if static_required:
    raise ValueError(
        f'{name}: collecting the perturbed passes\' aux (perturbed_aux=) with '
        'sharpness_steps needs a static sharpness_step=True/False in update(); see '
        'sse_sam_jax.optim.sharpness_reuse.is_sharpness_step.')
  return jax.lax.cond(traced_is_sharpness_step(state.count, steps), full, cheap)
