r"""A stage switch: pick a gradient transformation by step count, and SSE-SAM (Lyu et al.,
AAAI 2025, `arXiv:2412.13715 <https://arxiv.org/abs/2412.13715>`_).

:func:`stage_switch` runs ``transforms[i]`` while
``boundaries[i-1] <= count < boundaries[i]``. The choice is a ``lax.switch``
on the step count held in the state, so a jitted training step compiles once
and switches stage without recompiling. Every stage keeps its own state; the
transformations chained *after* the switch (weight decay, momentum, ...) see
one continuous stream of updates, so their state carries across the switch.

**Static stages.** ``update(..., stage=i)`` with a Python int runs stage ``i``
directly, with no ``lax.switch`` in the program. A trainer that counts steps on
the host can compile one program per stage ahead of time (two for SSE-SAM) and
pick by step; the state is the same in both, so it passes between them. Prefer
this on XLA:CPU, where convolution backward passes inside any control-flow
region (``lax.cond``/``switch``/``while``) run far slower than at top level (measured:
a 5-layer conv weight gradient, 0.13 s at top level, 10.7 s inside ``lax.cond``;
an SSE-SAM ResNet-32 step ~170 s instead of ~5 s). On GPU and TPU the in-program
switch costs nothing extra.

Called outside ``jit`` (a concrete count), the update picks the stage on the host
too: an eager ``lax.switch`` would trace and compile its branches at every call
(the loss function is a new closure each step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import core as jax_core

from sse_sam_jax.optim import group_methods, sam_and_asam, sharpness_aware, sharpness_reuse
from sse_sam_jax.optim.sharpness_aware import Radius
from sse_sam_jax.optim.sharpness_reuse import SharpnessSteps


class StageSwitchState(NamedTuple):
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  stage_states: tuple


def stage_switch(transforms: Sequence[optax.GradientTransformation],
                 boundaries: Sequence[int]) -> optax.GradientTransformationExtraArgs:
  """Selects one of ``transforms`` by step count.

  Args:
    transforms: ``K >= 1`` gradient transformations (extra arguments are
      forwarded to each).
    boundaries: ``K - 1`` non-decreasing step counts >= 0; stage ``i`` starts
      at step ``boundaries[i - 1]``. Equal boundaries skip a stage.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Every stage must return
    updates with the structure and dtypes of its input updates.

  Example:
    >>> import optax, sse_sam_jax as ssj
    >>> tx = ssj.stage_switch([ssj.sam(0.05), ssj.imbsam(0.1)], boundaries=[1000])
  """
  transforms = tuple(optax.with_extra_args_support(t) for t in transforms)
  boundaries = tuple(int(b) for b in boundaries)
  if not transforms:
    raise ValueError('stage_switch needs at least one transformation.')
  if len(boundaries) != len(transforms) - 1:
    raise ValueError(
        f'{len(transforms)} stages need {len(transforms) - 1} boundaries, got {len(boundaries)}.')
  if any(b < 0 for b in boundaries) or any(
      b1 > b2 for b1, b2 in zip(boundaries, boundaries[1:])):
    raise ValueError(f'boundaries must be non-negative and non-decreasing, got {boundaries}.')

  def init_fn(params):
    return StageSwitchState(count=jnp.zeros([], jnp.int32),
                            stage_states=tuple(t.init(params) for t in transforms))

  def update_fn(updates, state, params=None, *, stage=None, **extra_args):
    def make_branch(i):
      def branch(operands):
        updates, stage_states, params = operands
        new_updates, new_state = transforms[i].update(
            updates, stage_states[i], params, **extra_args)
        new_updates = jax.tree.map(lambda u, ref: u.astype(ref.dtype), new_updates, updates)
        return new_updates, stage_states[:i] + (new_state,) + stage_states[i + 1:]
      return branch

    if stage is None and not isinstance(state.count, jax_core.Tracer):
      stage = stage_at(int(state.count), boundaries)  # called outside jit: no lax.switch
    if stage is not None or len(transforms) == 1:
      stage = 0 if stage is None else stage
      if not isinstance(stage, int) or not 0 <= stage < len(transforms):
        raise ValueError(f'stage must be a Python int in [0, {len(transforms)}), got {stage!r}.')
      new_updates, stage_states = make_branch(stage)((updates, state.stage_states, params))
    else:
      if extra_args.get('perturbed_aux') is not None:
        raise ValueError('stage_switch: collecting the perturbed passes\' aux (perturbed_aux=) '
                         'needs a static stage: update(..., stage=i), see stage_at().')
      index = jnp.sum(state.count >= jnp.asarray(boundaries, jnp.int32)).astype(jnp.int32)
      new_updates, stage_states = jax.lax.switch(
          index, [make_branch(i) for i in range(len(transforms))],
          (updates, state.stage_states, params))
    count = jnp.asarray(optax.safe_increment(state.count))
    return new_updates, StageSwitchState(count, stage_states)

  update_fn.stage_boundaries = boundaries  # pyright: ignore[reportFunctionMemberAccess]
  update_fn.stage_transforms = transforms  # pyright: ignore[reportFunctionMemberAccess]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stage_boundaries(transform: optax.GradientTransformation) -> tuple[int, ...]:
  """The step boundaries of a :func:`stage_switch` (``()`` for any other transform).

  A trainer that compiles one program per stage (``update(..., stage=i)``) reads
  them here, from the transform itself, instead of recomputing them.

  >>> import sse_sam_jax as ssj
  >>> ssj.stage_boundaries(ssj.sse_sam(0.05, 0.1, switch_step=700))
  (700,)
  """
  return tuple(getattr(transform.update, 'stage_boundaries', ()))


def stage_at(step: int, boundaries: Sequence[int]) -> int:
  """The stage :func:`stage_switch` runs at ``step`` (host-side, for static stages)."""
  return int(np.searchsorted(np.asarray(boundaries), step, side='right'))


def sharpness_step_at(transform: optax.GradientTransformation, step: int) -> bool | None:
  """Host-side: whether step ``step`` (the count of steps before it) runs the
  perturbed passes of ``transform``, built with ``sharpness_steps``; ``None`` when
  every step does (nothing to choose). For a :func:`stage_switch` the stage's own
  count (steps since the stage began) decides, as in the program. Pass the answer
  as ``update(..., sharpness_step=...)`` to compile one program per kind.

  >>> import sse_sam_jax as ssj
  >>> tx = ssj.sse_sam(0.05, 0.1, switch_step=7, sharpness_steps=ssj.looksam(every=5))
  >>> [ssj.sharpness_step_at(tx, s) for s in (0, 1, 5, 7, 12)]
  [True, False, True, True, True]
  """
  stages = getattr(transform.update, 'stage_transforms', None)
  if stages is not None:
    starts = (0,) + stage_boundaries(transform)
    index = stage_at(step, starts[1:])
    transform, step = stages[index], step - starts[index]
  steps = sharpness_aware.sharpness_steps_of(transform)
  if sharpness_reuse.always_exact(steps):
    return None
  return sharpness_reuse.is_sharpness_step(step, steps)


def switch_step(gamma: float, epochs: int, steps_per_epoch: int) -> int:
  """First step of stage 2: ``ceil(gamma * epochs) * steps_per_epoch``.

  ``gamma = 0`` starts in stage 2; ``gamma = 1`` gives ``epochs *
  steps_per_epoch``, i.e. never switches within training.
  """
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'gamma must lie in [0, 1], got {gamma}.')
  if int(epochs) != epochs or epochs < 1:
    raise ValueError(f'epochs must be a positive integer, got {epochs}.')
  if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be a positive integer, got {steps_per_epoch}.')
  return math.ceil(gamma * epochs) * int(steps_per_epoch)


def _shifted(rho: Radius, offset: int) -> Radius:
  if callable(rho):
    return lambda count: rho(count + offset)
  return rho


def _check_switch_step(switch_step):
  value = sharpness_aware.concrete_value(switch_step)
  if value is None:
    raise TypeError(
        'switch_step must be a Python int, not a traced value. Under optax.inject_hyperparams, '
        "list it in static_args: optax.inject_hyperparams(ssj.sse_sam, static_args=("
        "'switch_step', 'tail_classes')).")
  switch_step = value.item() if value.shape == () else switch_step
  if isinstance(switch_step, bool) or int(switch_step) != switch_step or switch_step < 0:
    raise ValueError(f'switch_step must be an integer >= 0, got {switch_step!r}.')
  return int(switch_step)


def sse_sam(head_rho: Radius, tail_rho: Radius, switch_step: int, *,
            normalization: str = 'batch', tail_weight: float = 1.0,
            tail_classes=None, mask=None, adaptive_eta: float | None = None,
            sharpness_steps: SharpnessSteps | None = None,
            ) -> optax.GradientTransformationExtraArgs:
  r"""SSE-SAM (Lyu et al., AAAI 2025, `arXiv:2412.13715 <https://arxiv.org/abs/2412.13715>`_):
  separate head/tail perturbations, then tail-only (ImbSAM).

  Stage 1 (steps ``< switch_step``):

  .. math::
    g = \nabla L_H\big(w + \rho_H\, \hat g_H\big) + \nabla L_T\big(w + \rho_T\, \hat g_T\big),
    \quad \hat g_k = \nabla L_k(w) / \lVert \nabla L_k(w) \rVert,

  each group perturbed **separately** (not plain SAM on the whole loss).
  Stage 2 is :func:`imbsam` (``rho_H = 0``): the head's perturbed pass is
  skipped. Group losses are batch-normalised by default, as in the authors'
  code. Use :func:`switch_step` to derive the step from ``gamma``. A ``tail_rho``
  schedule is evaluated at the global step count in both stages.

  Radii may be arrays (``optax.inject_hyperparams(ssj.sse_sam, static_args=
  ('switch_step', 'tail_classes'))``); ``mask`` perturbs a subset of the
  parameters in both groups (see :mod:`sse_sam_jax.optim.sharpness_aware`);
  ``adaptive_eta`` makes every group's ascent step ASAM's; ``sharpness_steps``
  runs the perturbed passes on some steps only (LookSAM-style reuse, counted
  from each stage's start; :mod:`sse_sam_jax.optim.sharpness_reuse`).

  Passes per step: stage 1 one clean forward, two clean backwards and two
  perturbed forward+backward passes (11 units, 3.7x SGD); stage 2, 8 units (2.7x).

  Example:
    >>> import optax, sse_sam_jax as ssj
    >>> tail = ssj.tail_classes([5000, 500, 50], eta=100)
    >>> step = ssj.switch_step(gamma=0.7, epochs=200, steps_per_epoch=97)
    >>> tx = optax.chain(
    ...     ssj.sse_sam(0.05, 0.1, switch_step=step, tail_classes=tail),
    ...     optax.add_decayed_weights(1e-3),
    ...     optax.sgd(0.01, momentum=0.9))
  """
  switch_step = _check_switch_step(switch_step)
  sharpness_aware.validate_radius(head_rho, 'head_rho')
  class_groups = group_methods._head_tail_class_groups(tail_classes)
  def stage(rhos):
    return group_methods.group_sam(
        rhos, normalization=normalization, group_weights=(1.0, tail_weight),
        class_groups=class_groups, mask=mask, adaptive_eta=adaptive_eta,
        sharpness_steps=sharpness_steps, name='sse_sam')

  stage1 = stage((head_rho, tail_rho))
  stage2 = stage((0.0, _shifted(tail_rho, switch_step)))
  return stage_switch([stage1, stage2], [switch_step])


def sam_then_imbsam(rho: Radius, tail_rho: Radius, switch_step: int, *,
                    normalization: str = 'batch', tail_weight: float = 1.0,
                    tail_classes=None, mask=None, adaptive_eta: float | None = None,
                    sharpness_steps: SharpnessSteps | None = None,
                    ) -> optax.GradientTransformationExtraArgs:
  """The abstract's wording of SSE-SAM: plain SAM, then ImbSAM from ``switch_step``.

  Not the authors' code (see :func:`sse_sam`); offered as a variant.
  """
  switch_step = _check_switch_step(switch_step)
  return stage_switch(
      [sam_and_asam.sam(rho, mask=mask, adaptive_eta=adaptive_eta,
                           sharpness_steps=sharpness_steps),
       group_methods.imbsam(_shifted(tail_rho, switch_step), normalization=normalization,
                              tail_weight=tail_weight, tail_classes=tail_classes, mask=mask,
                              adaptive_eta=adaptive_eta, sharpness_steps=sharpness_steps)],
      [switch_step])
