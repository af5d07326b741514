"""The train state and the one jitted training step.

A step is one clean forward pass at ``w`` (training-mode BatchNorm, whose
running statistics are the ones kept), the backward passes the optimizer asks
for, the perturbed passes (inside the optimizer), and the base optimizer. The
clean pass is shared with the optimizer through ``loss_vjp``, so no
sharpness-aware method repeats it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

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


def train_step(state: TrainState, batch: dict, *, model, tx, loss: PerExampleLoss,
               class_groups=None):
  """One optimization step. ``batch`` has ``'x'`` and ``'label'``.

  ``class_groups`` (int ``[C]``, head 0 / tail 1) gives every example its group
  for the group methods. Returns ``(new_state, metrics)``; ``metrics`` holds sums
  over the batch (``loss_sum``, ``correct``, ``count``) so that they add up
  across steps and devices, and ``finite`` (False if the loss or the new
  parameters are NaN/Inf).
  """
  x, labels = batch['x'], batch['label']

  def clean_pass(params):
    logits, new_stats = model.apply(params, state.batch_stats, x, train=True)
    return loss(logits, labels, state.step), (logits, new_stats)

  def loss_fn(params):  # perturbed passes: full-batch BN statistics, running stats dropped
    logits, _ = model.apply(params, state.batch_stats, x, train=True)
    return loss(logits, labels, state.step)

  losses, vjp_fn, (logits, new_stats) = jax.vjp(clean_pass, state.params, has_aux=True)
  # The plain gradient; sharpness-aware transforms given `loss_vjp` do not read it, and
  # the compiler drops it then (see benchmarks/step_cost.py).
  grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
  extra = dict(loss_fn=loss_fn, loss_vjp=(losses, vjp_fn), labels=labels)
  if class_groups is not None:
    extra['group_ids'] = jnp.asarray(class_groups)[labels]
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)

  loss_sum = jnp.sum(losses)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.global_norm(params))
  metrics = dict(loss_sum=loss_sum.astype(jnp.float32),
                 correct=jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
                 count=jnp.asarray(labels.shape[0], jnp.int32), finite=finite)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state)
  return new_state, metrics


def jit_train_step(model, tx, loss: PerExampleLoss, class_groups=None, *,
                   state_sharding=None, batch_sharding=None):
  """``train_step`` jitted once, with the state donated.

  With shardings (``jax.sharding.NamedSharding``), the batch is split over the
  mesh's data axis and the state placed as given; the perturbation is computed
  from the global batch (what one device would compute).
  """
  fn = functools.partial(train_step, model=model, tx=tx, loss=loss, class_groups=class_groups)
  kwargs = {}
  if state_sharding is not None:
    kwargs = dict(in_shardings=(state_sharding, batch_sharding),
                  out_shardings=(state_sharding, None))
  return jax.jit(fn, donate_argnums=(0,), **kwargs)
