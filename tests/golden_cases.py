"""Loads the golden trajectories (authors' PyTorch optimizers, float64) and their MLP."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sse_sam_jax as ssj


def as_float64(tree):
  """``tree`` with every floating-point array in float64 (x64 must be on), others kept."""
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def enable_x64():
  """``jax.enable_x64(True)``, or ``jax.experimental.enable_x64()`` on jax < 0.6."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as legacy  # pylint: disable=g-import-not-at-top
  return legacy()


GOLDEN_DIR = pathlib.Path(__file__).parent / 'data' / 'golden'
CASES = sorted(p.stem for p in GOLDEN_DIR.glob('*.json'))
PARAM_NAMES = ('fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias', 'bn_scale', 'bn_bias')


def load(name):
  meta = json.loads((GOLDEN_DIR / f'{name}.json').read_text())
  arrays = dict(np.load(GOLDEN_DIR / f'{name}.npz'))
  return meta, arrays


def params_at(arrays, step):
  return {k: jnp.asarray(arrays[k][step]) for k in PARAM_NAMES if k in arrays}


def mlp_logits(params, x):
  h = x @ params['fc1_kernel'] + params['fc1_bias']
  if 'bn_scale' in params:  # training-mode BatchNorm: full-batch stats, biased variance
    mean = jnp.mean(h, axis=0)
    var = jnp.mean(jnp.square(h - mean), axis=0)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * params['bn_scale'] + params['bn_bias']
  return jax.nn.relu(h) @ params['fc2_kernel'] + params['fc2_bias']


def per_example_ce(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_logits(params, x), y)


def direction_transform(meta):
  """The sharpness-aware part of the golden case's optimizer (None for SGD)."""
  method = meta['method']
  tail = ssj.tail_classes(meta['class_counts'], meta['eta'])
  if method == 'sgd':
    return None
  if method == 'sam':
    return ssj.sam(meta['rho'])
  if method in ('imbsam_group', 'imbsam_batch'):
    return ssj.imbsam(meta['rho'], normalization=method.split('_')[1],
                      tail_weight=meta.get('tail_weight', 1.0), tail_classes=tail)
  if method == 'ssesam':
    step = ssj.switch_step(meta['gamma'], meta['epochs'], meta['steps_per_epoch'])
    assert step == meta['switch_step']
    return ssj.sse_sam(meta['head_rho'], meta['tail_rho'], step, tail_classes=tail)
  raise ValueError(method)


def optimizer(meta):
  base = [optax.add_decayed_weights(meta['weight_decay']),
          optax.sgd(meta['lr'], momentum=meta['momentum'])]
  direction = direction_transform(meta)
  return optax.chain(*([direction] if direction is not None else []), *base)


def make_step(tx, share_clean_pass=True):
  """One training step as a trainer writes it: one clean forward, then the optimizer."""

  def step(params, opt_state, x, y):
    loss_fn = lambda p: per_example_ce(p, x, y)
    losses, vjp_fn = jax.vjp(loss_fn, params)
    grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
    extra = dict(loss_fn=loss_fn, labels=y)
    if share_clean_pass:
      extra['loss_vjp'] = (losses, vjp_fn)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state

  return step
