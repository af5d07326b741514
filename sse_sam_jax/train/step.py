"""The train state and the one training step, as a function to jit (per microbatch, per
device); :mod:`sse_sam_jax.train.compiled_step` compiles and dispatches it.

A step is one clean forward pass at ``w`` (training-mode BatchNorm, whose
running statistics are the ones kept), the backward passes the optimizer asks
for, the perturbed passes (inside the optimizer), and the base optimizer. The
clean pass is shared with the optimizer through ``loss_vjp``, so no
sharpness-aware method repeats it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# (logits, labels, step) -> per-example losses [B]
PerExampleLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


RUNNING_STATS = ('clean', 'last_perturbed', 'every_pass')
PASSES = ('clean', 'perturbed')


def train_step(state: TrainState, batch: dict, *, model, tx, loss: PerExampleLoss,
               class_groups=None, stage: int | None = None, sharpness_step: bool | None = None,
               running_stats: str | tuple = 'clean'):
  """One optimization step. ``batch`` has ``'x'`` and ``'label'``.

  ``class_groups`` (int ``[C]``, head 0 / tail 1) gives every example its group
  for the group methods. ``stage`` (a Python int) fixes the stage of a
  :func:`sse_sam_jax.stage_switch` in the chain (see there). Returns
  ``(new_state, metrics)``; ``metrics`` holds sums over the batch (``loss_sum``,
  ``correct``, ``count``) so that they add up across steps and devices, and
  ``finite`` (False if the loss or the new parameters are NaN/Inf).

  A padded batch (the epoch's last, partial, batch run in the full batch's program)
  has ``'mask'`` (bool ``[B]``, False on padding): the loss is called as ``loss(logits,
  labels, step, mask)`` and every real example's loss weighted ``B / count``, padding's
  0, so that the means over ``B`` that the optimizers take (SAM's ``1/B``, the group
  sums with ``normalization='batch'``) are the means over the real examples; padding
  is in no group, BatchNorm leaves it out of its statistics (the model must mask it:
  ``model.masks_padding``), and the metrics count the real examples only. (Group sums
  with ``normalization='group'`` divide by a group's size instead: pad only without them.)

  ``sharpness_step`` (a Python bool) fixes the kind of step of a transform built
  with ``sharpness_steps`` (see :mod:`sse_sam_jax.optim.sharpness_reuse`).
  ``running_stats``: BatchNorm running statistics updated from the clean pass
  (``'clean'``, the default) or from the last perturbed pass of the step
  (``'last_perturbed'``; the clean pass's when the step has none), as the
  authors' PyTorch loop, whose every forward pass updates them, ends up with
  the last pass's batch statistics folded in last. ``'every_pass'``: the statistics
  of every pass folded in, in order (the clean pass, then each perturbed pass), as
  that loop does (:meth:`~sse_sam_jax.models.FunctionalModel.fold_running_stats`);
  or a tuple of ``'clean'`` / ``'perturbed'`` giving the order of the passes a
  reference runs, each ``'perturbed'`` the next perturbed pass and each ``'clean'``
  a pass at ``w`` (the clean pass's statistics: a reference that recomputes the
  forward pass at ``w``, or runs one at a zero radius, folds them in again).
  """
  plan = _pass_plan(running_stats)
  x, labels, mask = batch['x'], batch['label'], batch.get('mask')
  if mask is None:
    apply = functools.partial(model.apply, train=True)
    example_losses = lambda logits: loss(logits, labels, state.step)
  else:
    if not getattr(model, 'masks_padding', False):
      raise ValueError("the batch has a 'mask' (padding) but the model's BatchNorm would "
                       'count the padded examples; build its BatchNorm layers as '
                       'sse_sam_jax.models.MaskedBatchNorm.')
    apply = functools.partial(model.apply, train=True, example_mask=mask)
    count = jnp.sum(mask.astype(jnp.int32))
    b = mask.shape[0]

    def example_losses(logits):
      # B / count on the real examples, 0 on padding: every mean over the B examples
      # (the optimizers' 1/B and group sums) is then the mean over the real ones.
      losses = loss(logits, labels, state.step, mask)
      weight = jnp.where(mask, b / jnp.maximum(count, 1).astype(losses.dtype), 0)
      return losses * weight.astype(losses.dtype)

  def clean_pass(params):
    logits, new_stats = apply(params, state.batch_stats, x)
    return example_losses(logits), (logits, new_stats)

  keep_perturbed = running_stats != 'clean'

  def loss_fn(params):  # perturbed passes: full-batch BN statistics
    logits, stats = apply(params, state.batch_stats, x)
    losses = example_losses(logits)
    return (losses, stats) if keep_perturbed else losses  # running stats dropped by default

  losses, vjp_fn, (logits, new_stats) = jax.vjp(clean_pass, state.params, has_aux=True)
  # The plain gradient; sharpness-aware transforms given `loss_vjp` do not read it, and
  # the compiler drops it then (see benchmarks/step_cost.py).
  grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
  extra = dict(loss_fn=loss_fn, loss_vjp=(losses, vjp_fn), labels=labels)
  if class_groups is not None:
    extra['group_ids'] = jnp.asarray(class_groups)[labels]
    if mask is not None:  # padding in no group (its losses are 0 anyway)
      extra['group_ids'] = jnp.where(mask, extra['group_ids'], -1)
  if stage is not None:
    extra['stage'] = stage
  if sharpness_step is not None:
    extra['sharpness_step'] = sharpness_step
  perturbed_stats = []
  if keep_perturbed:
    extra['perturbed_aux'] = perturbed_stats
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  if plan is not None:
    new_stats = _fold_passes(model, state.batch_stats, new_stats, perturbed_stats, plan)
  elif perturbed_stats:
    new_stats = perturbed_stats[-1]
  params = optax.apply_updates(state.params, updates)

  loss_sum = jnp.sum(losses)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.tree.norm(params))
  hits = jnp.argmax(logits, -1) == labels
  if mask is None:
    count = jnp.asarray(labels.shape[0], jnp.int32)
  else:  # the weighted losses sum to B / count times the real examples' sum
    loss_sum, hits = loss_sum * (count / labels.shape[0]), hits & mask
  metrics = dict(loss_sum=loss_sum.astype(jnp.result_type(jnp.float32, loss_sum.dtype)),
                 correct=jnp.sum(hits).astype(jnp.int32), count=count.astype(jnp.int32),
                 finite=finite)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state)
  return new_state, metrics


def _pass_plan(running_stats):
  """``None`` for 'clean' / 'last_perturbed'; the order of passes otherwise."""
  if isinstance(running_stats, str):
    if running_stats not in RUNNING_STATS:
      raise ValueError(f'running_stats must be one of {RUNNING_STATS} or a tuple of '
                       f'{PASSES}, got {running_stats!r}.')
    return () if running_stats == 'every_pass' else None
  plan = tuple(running_stats)
  if not plan or any(p not in PASSES for p in plan):
    raise ValueError(f'running_stats: a pass order is a non-empty tuple of {PASSES}, got '
                     f'{running_stats!r}.')
  return plan


def _fold_passes(model, old, clean, perturbed: list, plan: tuple):
  """The running statistics after the passes of ``plan`` (``()``: the clean pass, then
  every perturbed one)."""
  if not plan:
    plan = ('clean',) + ('perturbed',) * len(perturbed)
  wanted = plan.count('perturbed')
  if wanted != len(perturbed):
    raise ValueError(f'running_stats: the pass order {plan} has {wanted} perturbed passes; '
                     f'this step ran {len(perturbed)}.')
  remaining = iter(perturbed)
  return model.fold_running_stats(
      old, [clean if p == 'clean' else next(remaining) for p in plan])


MICROBATCH_AXIS = 'microbatch'


def _sum_metrics(metrics, reduce_sum):
  """Metric sums added over devices or microbatches; ``finite`` only if finite in all."""
  return dict(loss_sum=reduce_sum(metrics['loss_sum']), correct=reduce_sum(metrics['correct']),
              count=reduce_sum(metrics['count']),
              finite=reduce_sum(1 - metrics['finite'].astype(jnp.int32)) == 0)


def per_microbatch(step_fn, size: int, axis: str = MICROBATCH_AXIS):
  """Runs ``step_fn`` on every run of ``size`` consecutive examples of the batch (``vmap``).

  Every microbatch has its own clean pass, its own perturbation and its own
  BatchNorm statistics (ghost BatchNorm); the optimizer chain must average the
  direction across ``axis`` (``ssj.mean_across(axis)``), after which every
  microbatch's update is the same and the first is kept. The running statistics
  are averaged and the metric sums added over microbatches. The result depends
  on ``size`` only, not on how the batch lies on devices. On several devices
  run it inside :func:`per_device`: under a plain global ``jit`` the compiler
  gathers the activations of the vmapped convolutions across devices
  (``benchmarks/collectives.py``).
  """

  def step(state, batch):
    b = batch['label'].shape[0]
    if 'mask' in batch:  # each microbatch would weight by its own count (see train_step)
      raise ValueError('per_microbatch does not take padded batches (a mask); run the '
                       'partial batch unpadded.')
    if b % size:
      raise ValueError(f'batch of {b} examples does not split into microbatches of {size}.')
    split = jax.tree.map(lambda a: a.reshape((b // size, size) + a.shape[1:]), batch)
    new_states, metrics = jax.vmap(step_fn, in_axes=(None, 0), axis_name=axis)(state, split)
    new_state = jax.tree.map(lambda a: a[0], new_states)._replace(
        batch_stats=jax.tree.map(lambda a: jnp.mean(a, axis=0), new_states.batch_stats))
    return new_state, _sum_metrics(metrics, lambda a: jnp.sum(a, axis=0))

  return step


def per_device(step_fn, mesh, axis: str):
  """Runs ``step_fn`` on every device's shard of the batch (``shard_map``).

  The optimizer chain must average the direction across ``axis`` (see
  :func:`sse_sam_jax.mean_across`), so every device then applies the same update
  to its replicated state. BatchNorm statistics are per device in every pass;
  the running statistics are averaged, and the metric sums added, across devices.
  With FSDP-sharded state the step gathers the whole state onto every device
  on entry (the compiler inserts the all-gathers) and keeps its shard on exit.
  """
  from jax.sharding import PartitionSpec as P

  def local(state, batch):
    new_state, metrics = step_fn(state, batch)
    new_state = new_state._replace(
        batch_stats=jax.lax.pmean(new_state.batch_stats, axis))
    return new_state, _sum_metrics(metrics, lambda a: jax.lax.psum(a, axis))

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P()),
                       check_vma=False)
