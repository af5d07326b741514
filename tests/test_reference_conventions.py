"""The options that let the trainer run as the reference PyTorch loop does (replayed whole
in tests/test_trainer_golden.py), each pinned on its own: BatchNorm's unbiased running
variance and the folding of every forward pass, the per-optimizer pass orders, foreign
initial weights, a given batch order, float64 runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sse_sam_jax as ssj
from sse_sam_jax import data as data_lib
from sse_sam_jax import models
from sse_sam_jax.models import masking
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import setup
from sse_sam_jax.train.step import init_state, train_step
from tests import golden_cases


def _bn_model():
  return models.functional(nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                                          models.MaskedBatchNorm(4, momentum=0.9,
                                                                 rngs=nnx.Rngs(0))))


def _bn_input(x, params):
  p = nnx.to_pure_dict(params)['layers'][0]
  return x @ p['kernel'] + p['bias']


@pytest.mark.parametrize('masked', [False, True])
def test_the_unbiased_running_variance_is_pytorchs(masked):
  model, params, stats = _bn_model()
  model = models.FunctionalModel(model.train_graph, model.eval_graph, model.masks_padding,
                                 running_variance='unbiased', bn_momentum=model.bn_momentum)
  x = jax.random.normal(jax.random.key(0), (6, 3)) * 3 + 1
  stats = jax.tree.map(lambda a: a + 0.25, stats)  # running mean 0.25, var 1.25
  mask = jnp.asarray([True, True, False, True, True, False]) if masked else None
  _, new = model.apply(params, stats, x, train=True, example_mask=mask)
  h = np.asarray(_bn_input(x, params))[np.asarray(mask) if masked else slice(None)]
  m = len(h)
  want_var = 0.9 * 1.25 + 0.1 * h.var(axis=0) * m / (m - 1)
  want_mean = 0.9 * 0.25 + 0.1 * h.mean(axis=0)
  got = nnx.to_pure_dict(new)['layers'][1]
  np.testing.assert_allclose(got['var'], want_var, rtol=2e-6)
  np.testing.assert_allclose(got['mean'], want_mean, rtol=2e-6, atol=1e-7)
  # the default stays Flax's biased variance
  _, biased = _bn_model()[0].apply(params, stats, x, train=True, example_mask=mask)
  np.testing.assert_allclose(nnx.to_pure_dict(biased)['layers'][1]['var'],
                             0.9 * 1.25 + 0.1 * h.var(axis=0), rtol=2e-6)
  with pytest.raises(ValueError, match='running variance must be one of'):
    with masking.running_variance('sample'):
      pass


def test_folding_several_passes_is_running_them_one_after_another():
  with golden_cases.enable_x64():
    model, params, stats = _bn_model()
    params, stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, stats))
    xs = [jax.random.normal(jax.random.key(k), (5, 3), jnp.float64) for k in range(3)]
    entries = [model.apply(params, stats, x, train=True)[1] for x in xs]  # each from `stats`
    folded = model.fold_running_stats(stats, entries)
    sequential = stats
    for x in xs:
      sequential = model.apply(params, sequential, x, train=True)[1]
    for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(sequential)):
      np.testing.assert_allclose(a, b, rtol=1e-14)
    assert model.fold_running_stats(stats, []) is stats
    mixed = nnx.Sequential(nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0)),
                           nnx.BatchNorm(3, momentum=0.99, rngs=nnx.Rngs(0)))
    assert models.functional(mixed)[0].bn_momentum is None


def test_every_pass_folds_the_clean_and_the_perturbed_pass_of_a_sam_step():
  with golden_cases.enable_x64():
    model, params, stats = _bn_model()
    params, stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, stats))
    tx = optax.chain(ssj.sam(0.5), optax.sgd(0.1))
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    batch = {'x': x, 'label': jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])}
    ce = lambda logits, labels, step: optax.softmax_cross_entropy_with_integer_labels(
        logits, labels)
    state = init_state(params, stats, tx)
    every, _ = train_step(state, batch, model=model, tx=tx, loss=ce, running_stats='every_pass')
    order, _ = train_step(state, batch, model=model, tx=tx, loss=ce,
                          running_stats=('clean', 'perturbed'))
    clean, _ = train_step(state, batch, model=model, tx=tx, loss=ce)
    last, _ = train_step(state, batch, model=model, tx=tx, loss=ce,
                         running_stats='last_perturbed')
    # by hand: the clean pass at w, then the pass at w + eps, from the state's statistics
    want = model.fold_running_stats(stats, [clean.batch_stats, last.batch_stats])
    for a, b, c in zip(jax.tree.leaves(every.batch_stats), jax.tree.leaves(want),
                       jax.tree.leaves(order.batch_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-14)
      np.testing.assert_array_equal(a, c)
    # and it is neither of the single passes
    assert not np.allclose(jax.tree.leaves(every.batch_stats)[1],
                           jax.tree.leaves(last.batch_stats)[1], rtol=1e-6)
    twice, _ = train_step(state, batch, model=model, tx=tx, loss=ce,
                          running_stats=('clean', 'clean', 'perturbed'))
    want = model.fold_running_stats(stats, [clean.batch_stats] * 2 + [last.batch_stats])
    np.testing.assert_allclose(jax.tree.leaves(twice.batch_stats)[1], jax.tree.leaves(want)[1],
                               rtol=1e-14)
    with pytest.raises(ValueError, match='has 2 perturbed passes; this step ran 1'):
      train_step(state, batch, model=model, tx=tx, loss=ce,
                 running_stats=('clean', 'perturbed', 'perturbed'))
    with pytest.raises(ValueError, match='a pass order is a non-empty tuple'):
      train_step(state, batch, model=model, tx=tx, loss=ce, running_stats=('clean', 'w'))


@pytest.mark.parametrize('name, stage, want', [
    ('sgd', None, ('clean',)),
    ('sam', None, ('clean', 'perturbed')),
    ('imbsam', None, ('clean', 'perturbed')),
    ('sse_sam', 0, ('clean', 'perturbed', 'clean', 'perturbed')),
    ('sse_sam', 1, ('clean', 'clean', 'clean', 'perturbed')),  # the head's pass at w + 0
])
def test_the_reference_pass_order_of_each_optimizer(name, stage, want):
  c = config_lib.default_config()
  c.model.running_stats, c.optimizer.name = 'every_pass', name
  assert setup.running_stats_plan(c)(stage) == want
  c.optimizer.tail_rho = c.optimizer.rho = c.optimizer.head_rho = 0.0  # radius 0: a pass at w
  assert setup.running_stats_plan(c)(stage) == ('clean',) * len(want)
  c.model.running_stats = 'clean'
  assert setup.running_stats_plan(c) == 'clean'


def test_saved_weights_load_back_and_foreign_ones_are_checked(tmp_path):
  _, params, stats = models.create('conv1d', 10, seed=0)
  _, other_params, other_stats = models.create('conv1d', 10, seed=1)
  models.save_weights(tmp_path / 'w.npz', params, stats)
  p, s = models.load_weights(tmp_path / 'w.npz', other_params, other_stats)
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((params, stats))):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(jax.tree.leaves(other_params)[-1], jax.tree.leaves(params)[-1])
  with np.load(tmp_path / 'w.npz') as f:
    arrays = dict(f)
  assert 'params/conv1/kernel' in arrays and 'batch_stats/bn1/var' in arrays
  arrays['extra/thing'] = np.zeros(3)
  np.savez(tmp_path / 'extra.npz', **arrays)
  with pytest.raises(ValueError, match='extra/thing unexpected'):
    models.load_weights(tmp_path / 'extra.npz', params, stats)
  with pytest.raises(ValueError, match='cannot read the weights'):
    models.load_weights(tmp_path / 'missing.npz', params, stats)


def test_a_given_batch_order_is_the_order_of_every_epoch():
  split = data_lib.Split(np.arange(10, dtype=np.float32)[:, None], np.arange(10) % 3, 3)
  order = np.stack([np.arange(10)[::-1], np.roll(np.arange(10), 3)])
  it = iter(data_lib.train_batches(split, data_lib.BatchSpec(4), num_epochs=2, seed=0,
                                   order=order, prefetch_batches=0))
  got = [next(it)['x'][:, 0].astype(int).tolist() for _ in range(6)]
  assert got == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0], [7, 8, 9, 0], [1, 2, 3, 4], [5, 6]]
  with pytest.raises(ValueError, match=r'expected \[epochs >= 3, 10\]'):
    data_lib.train_batches(split, data_lib.BatchSpec(4), num_epochs=3, seed=0, order=order)
  with pytest.raises(ValueError, match='must be integers'):
    data_lib.check_batch_order(order.astype(float), 2, 10)


def test_config_refuses_what_the_reference_options_cannot_do():
  c = config_lib.default_config()
  c.model.param_dtype, c.model.compute_dtype = 'float64', 'bfloat16'
  with pytest.raises(ValueError, match="param_dtype='float64' computes in float64"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.model.running_stats, c.optimizer.sharpness_every = 'every_pass', 2
  with pytest.raises(ValueError, match="'every_pass' follows the references' passes"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.model.param_dtype = 'float16'
  with pytest.raises(ValueError, match='model.param_dtype must be one of'):
    config_lib.validate(c)
