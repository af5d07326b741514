"""Averaging sharpness-aware directions across devices or microbatches."""

from __future__ import annotations

import jax
import optax


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
