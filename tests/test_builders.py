"""The trainer's builders: base optimizers, clipping after the transform, warm-up on every
schedule, stage boundaries read from the transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sse_sam_jax as ssj
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import schedules, setup
from tests.test_trainer import set_keys

SPE = 10


def config(**overrides):
  c = config_lib.default_config()
  c.epochs = 20
  c = set_keys(c, **overrides)
  config_lib.validate(c)
  return c


def toy():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  params = {'w': jax.random.normal(k[0], (5, 3)), 'b': jnp.zeros(3)}
  x, y = jax.random.normal(k[1], (8, 5)), jnp.arange(8) % 3
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p['w'] + p['b'], y)
  return params, loss_fn


def steps(tx, n=3):
  params, loss_fn = toy()
  state = tx.init(params)
  for _ in range(n):
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, stage=0) \
        if ssj.stage_boundaries(tx) else tx.update(grads, state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('base,reference', [
    ('sgd', lambda: [optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9)]),
    ('nesterov', lambda: [optax.add_decayed_weights(1e-3),
                          optax.sgd(0.1, momentum=0.9, nesterov=True)]),
    ('adamw', lambda: [optax.adamw(0.1, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-3)]),
])
def test_base_optimizer_from_the_config(base, reference):
  c = config(**{'optimizer.name': 'sam', 'optimizer.base': base, 'optimizer.lr': 0.1,
                'optimizer.schedule': 'constant', 'optimizer.weight_decay': 1e-3,
                'optimizer.b1': 0.8, 'optimizer.b2': 0.99, 'optimizer.eps': 1e-6})
  tx, boundaries, _ = setup.build_optimizer(c, SPE)
  assert boundaries == []
  want = steps(optax.chain(ssj.sam(c.optimizer.rho), *reference()))
  got = steps(tx)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  other = steps(optax.chain(ssj.sam(c.optimizer.rho), optax.sgd(0.1)))
  assert not np.allclose(got['w'], other['w'], atol=1e-5)


def test_clipping_comes_after_the_sharpness_aware_transform():
  c = config(**{'optimizer.name': 'sam', 'optimizer.clip_norm': 0.01, 'optimizer.lr': 1.0,
                'optimizer.schedule': 'constant', 'optimizer.momentum': 0.0,
                'optimizer.weight_decay': 0.0})
  tx, _, _ = setup.build_optimizer(c, SPE)
  params, loss_fn = toy()
  grads = jax.grad(lambda p: loss_fn(p).mean())(params)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  direction, _ = ssj.sam(c.optimizer.rho).update(grads, ssj.sam(0.05).init(params), params,
                                                   loss_fn=loss_fn)
  norm = float(optax.tree.norm(direction))
  assert norm > 0.01
  jax.tree.map(lambda u, d: np.testing.assert_allclose(u, -d * 0.01 / norm, rtol=1e-5),
               updates, direction)


@pytest.mark.parametrize('schedule', ['cosine', 'constant', 'ldam_step'])
def test_warmup_is_honoured_by_every_schedule(schedule):
  lr = schedules.make(schedule, 0.1, 200, SPE, warmup_epochs=5)
  got = [float(lr(e * SPE)) for e in range(5)]
  np.testing.assert_allclose(got, [0.02, 0.04, 0.06, 0.08, 0.1], rtol=1e-6)
  no_warmup = schedules.make(schedule, 0.1, 200, SPE, warmup_epochs=0)
  assert float(lr(5 * SPE)) == pytest.approx(float(no_warmup(5 * SPE)))
  assert float(no_warmup(0)) > 0.09  # without warm-up the first epoch runs at ~lr


def test_stage_boundaries_are_read_from_the_transform():
  c = config(**{'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.7})
  tx, boundaries, _ = setup.build_optimizer(c, SPE)
  assert boundaries == [ssj.switch_step(0.7, 20, SPE)] == [140]
  assert ssj.stage_boundaries(ssj.sam(0.1)) == ()
  assert ssj.stage_boundaries(ssj.stage_switch([ssj.sam(0.1), ssj.sam(0.2), ssj.sam(0.3)],
                                               [5, 9])) == (5, 9)


@pytest.mark.parametrize('key,value,match', [
    ('optimizer.base', 'lamb', 'unknown optimizer.base'),
    ('optimizer.clip_norm', -1.0, 'clip_norm must be >= 0'),
    ('optimizer.warmup_epochs', 20, r'warmup_epochs must be an integer in \[0, epochs\)'),
    ('background_compile_threads', -2, r'background_compile_threads must be an integer >= 0'),
])
def test_bad_builder_keys(key, value, match):
  with pytest.raises(ValueError, match=match):
    config(**{key: value})


@pytest.mark.parametrize('base', ['sgd', 'nesterov'])
def test_the_chain_order_at_non_degenerate_settings(base):
  """direction -> clip -> weight decay -> base optimizer, with momentum, weight decay and
  lr != 1 over several steps, against that order written out (clipping after the base
  optimizer, or weight decay before the clip, give other parameters here)."""
  clip, wd, lr, mom = 0.02, 5e-3, 0.07, 0.9
  c = config(**{'optimizer.name': 'sam', 'optimizer.base': base, 'optimizer.clip_norm': clip,
                'optimizer.lr': lr, 'optimizer.schedule': 'constant',
                'optimizer.momentum': mom, 'optimizer.weight_decay': wd})
  tx, _, _ = setup.build_optimizer(c, SPE)
  got = steps(tx, n=4)
  params, loss_fn = toy()
  sam, buf = ssj.sam(c.optimizer.rho), jax.tree.map(jnp.zeros_like, params)
  for _ in range(4):
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    d, _ = sam.update(grads, sam.init(params), params, loss_fn=loss_fn)
    scale = jnp.minimum(1.0, clip / optax.tree.norm(d))
    g = jax.tree.map(lambda d, p, scale=scale: d * scale + wd * p, d, params)
    buf = jax.tree.map(lambda m, g: mom * m + g, buf, g)
    step = jax.tree.map(lambda m, g: mom * m + g, buf, g) if base == 'nesterov' else buf
    params = jax.tree.map(lambda p, s: p - lr * s, params, step)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  assert float(optax.tree.norm(sam.update(jax.grad(lambda p: loss_fn(p).mean())(params),
                                          sam.init(params), params,
                                          loss_fn=loss_fn)[0])) > clip  # the clip bites
