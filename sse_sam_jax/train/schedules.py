"""Learning-rate schedules of the references, as optax schedules of the step count."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def epoch_cosine(lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """Cosine to 0 over epochs, stepped at the *start* of each epoch as the references do:
  epoch ``e`` (0-based) runs at ``lr * (1 + cos(pi * (e + 1) / E)) / 2``, the last at 0."""
  def schedule(count):
    epoch = count // steps_per_epoch
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(epoch + 1, epochs) / epochs))
  return schedule


def ldam_step(lr: float, steps_per_epoch: int, warmup_epochs: int = 5,
              decay_epochs=(160, 180), decay_factors=(0.01, 0.0001)) -> optax.Schedule:
  """LDAM-DRW: linear warm-up by epoch (``lr * (e + 1) / warmup``), then step decays:
  from 0-based epoch ``decay_epochs[i]`` on, run at ``lr * decay_factors[i]``."""
  def schedule(count):
    epoch = count // steps_per_epoch
    value = jnp.where(epoch < warmup_epochs, lr * (epoch + 1) / max(warmup_epochs, 1), lr)
    for boundary, factor in zip(decay_epochs, decay_factors):
      value = jnp.where(epoch >= boundary, lr * factor, value)
    return value
  return schedule


SCHEDULES = ('cosine', 'ldam_step', 'constant')


def with_warmup(schedule: optax.Schedule, lr: float, warmup_epochs: int,
                steps_per_epoch: int) -> optax.Schedule:
  """LDAM-DRW's linear warm-up by epoch, ``lr * (e + 1) / warmup_epochs`` for the first
  ``warmup_epochs`` epochs, then ``schedule``."""
  if warmup_epochs <= 0:
    return schedule

  def warm(count):
    epoch = count // steps_per_epoch
    return jnp.where(epoch < warmup_epochs, lr * (epoch + 1) / warmup_epochs, schedule(count))
  return warm


def make(name: str, lr: float, epochs: int, steps_per_epoch: int,
         warmup_epochs: int = 0) -> optax.Schedule:
  """The ``name`` schedule with ``warmup_epochs`` of linear warm-up (any schedule)."""
  if name == 'cosine':
    base = epoch_cosine(lr, epochs, steps_per_epoch)
  elif name == 'ldam_step':
    return ldam_step(lr, steps_per_epoch, warmup_epochs=warmup_epochs)
  elif name == 'constant':
    base = optax.constant_schedule(lr)
  else:
    raise ValueError(f'unknown schedule {name!r}; choose one of {SCHEDULES}.')
  return with_warmup(base, lr, warmup_epochs, steps_per_epoch)
