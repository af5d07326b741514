"""The SAM variants through the trainer: every `optimizer.name`, ASAM and cheaper steps
from the config, one program per kind of step compiled before step 0, a bit-identical
resume in the middle of a reuse cycle, and BatchNorm running statistics from the last
perturbed pass (`model.running_stats`)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sse_sam_jax as ssj
from sse_sam_jax import models
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import setup, trainer
from sse_sam_jax.train.step import init_state, train_step
from tests.test_trainer import make_npz, small_config


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return make_npz(tmp_path_factory.mktemp('data') / 'blobs.npz')


@pytest.mark.parametrize('overrides', [
    {'optimizer.name': 'asam', 'optimizer.rho': 0.5},
    {'optimizer.name': 'shot_sam'},
    {'optimizer.name': 'focal_sam', 'optimizer.focal_gamma': 2.0},
    {'optimizer.name': 'sse_sam', 'optimizer.adaptive': True, 'optimizer.head_rho': 0.3,
     'optimizer.tail_rho': 0.5},
], ids=['asam', 'shot_sam', 'focal_sam', 'adaptive_sse_sam'])
def test_variants_train_end_to_end(npz, tmp_path, overrides):
  c = small_config(npz, **{'optimizer.gamma': 0.5, **overrides})
  result = trainer.train(c, tmp_path, progress=False)
  assert result['test']['all'] > 0.5  # separable blobs: it learns
  stages = 2 if c.optimizer.name == 'sse_sam' else 1
  assert result['compiles'] == stages  # one program per stage (the last batch padded)


def test_the_config_reaches_every_variant():
  """Each name and key builds the transform it names (compared on one update)."""
  c = config_lib.default_config()
  stats = type('Stats', (), {'counts': np.array([500, 60, 8])})()
  params = {'kernel': jnp.array([[0.3, -0.2], [0.1, 0.4]]), 'bias': jnp.array([0.1, -0.1])}
  x, y = jnp.array([[1.0, 0.5], [0.2, -1.0], [0.3, 0.3]]), jnp.array([0, 1, 2])
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      jnp.concatenate([x @ p['kernel'] + p['bias'], jnp.zeros((3, 1))], 1), y)

  def direction(tx, **extra):
    return tx.update(params, tx.init(params), params, loss_fn=loss_fn, labels=y, **extra)[0]

  cases = [
      (dict(name='asam', rho=0.5), ssj.asam(0.5), {}),
      (dict(name='sam', rho=0.3, adaptive=True, adaptive_eta=0.1),
       ssj.sam(0.3, adaptive_eta=0.1), {}),
      (dict(name='focal_sam', rho=0.2, focal_lambda=0.5, focal_gamma=2.0),
       ssj.focal_sam(0.2, lam=0.5, gamma=2.0, class_counts=stats.counts), {}),
      (dict(name='shot_sam', shot_rhos=(0.0, 0.1, 0.3)), ssj.group_sam((0.0, 0.1, 0.3)),
       dict(group_ids=jnp.array([0, 1, 2]))),
      (dict(name='imbsam', tail_rho=0.2, sharpness_every=4, sharpness_alpha=0.5),
       ssj.imbsam(0.2, sharpness_steps=ssj.looksam(4, 0.5)), dict(group_ids=jnp.array([0, 0, 1]))),
  ]
  for keys, want, extra in cases:
    for k, v in keys.items():
      c.optimizer[k] = v
    config_lib.validate(c)
    got = setup.build_direction(c, 10, stats)
    chex.assert_trees_all_close(direction(got, **extra), direction(want, **extra), rtol=1e-6)
    c = config_lib.default_config()
  c.optimizer.name, c.optimizer.sharpness_fraction = 'sam', 0.5
  assert ssj.sharpness_steps_of(setup.build_direction(c, 10)) == ssj.SharpnessSteps(
      every=1, fraction=0.5, alpha=0.7, seed=0)


def _expected_programs(total, spe, switch, every, remainder_at):
  """(stage, sharpness step, batch size) of every step, from the rules written out."""
  kinds = set()
  for step in range(total):
    stage = int(step >= switch)
    local = step - switch * stage
    kinds.add((stage, local % every == 0, remainder_at is not None and step % spe == remainder_at))
  return len(kinds)


def test_looksam_sse_sam_compiles_each_kind_once_and_resumes_bit_identically(npz, tmp_path):
  c = small_config(npz, **{'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.5, 'epochs': 3,
                           'optimizer.sharpness_every': 3, 'optimizer.sharpness_alpha': 0.7})
  full = trainer.train(c, tmp_path / 'full', progress=False)
  spe = int(full['state'].step) // 3
  assert spe == 8  # 226 examples: 7 batches of 32 and one of 2
  # stage switch at epoch 2; on CPU each step is its own dispatch, its kind chosen on the
  # host; the last batch of an epoch runs padded in the full batch's programs
  assert full['compiles'] == _expected_programs(3 * spe, spe, 2 * spe, 3, remainder_at=None)
  assert full['test']['all'] > 0.5
  assert isinstance(full['state'].opt_state[0].stage_states[0], ssj.SharpnessReuseState)
  # killed at step 10: in the middle of a reuse cycle (the stored component is resumed)
  trainer.train(c, tmp_path / 'cut', progress=False, stop_after_steps=10)
  resumed = trainer.train(c, tmp_path / 'cut', progress=False)
  chex.assert_trees_all_equal(jax.device_get(resumed['state']), jax.device_get(full['state']))


@pytest.mark.parametrize('key,value,match', [
    ('optimizer.sharpness_every', 0, 'sharpness_every must be an integer >= 1'),
    ('optimizer.sharpness_fraction', 0.0, r'sharpness_fraction must lie in \(0, 1\]'),
    ('optimizer.sharpness_alpha', -1.0, 'sharpness_alpha must be finite'),
    ('optimizer.adaptive_eta', -0.1, 'adaptive_eta must be finite'),
    ('optimizer.shot_rhos', (0.1, 0.2), 'shot_rhos must be 3 radii'),
    ('model.running_stats', 'perturbed', 'running_stats must be one of'),
])
def test_bad_variant_keys(key, value, match):
  c = small_config('x.npz', **{key: value})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_last_perturbed_running_stats_need_host_chosen_steps():
  c = small_config('x.npz', **{'model.running_stats': 'last_perturbed',
                               'optimizer.sharpness_every': 2, 'steps_per_dispatch': 4})
  with pytest.raises(ValueError, match='steps_per_dispatch=1'):
    config_lib.validate(c)


# ----------------------------------------------------------------------------
# BatchNorm running statistics from the last perturbed pass.
# ----------------------------------------------------------------------------
def _bn_setup():
  model, params, stats = models.create('mlp', 4, seed=0, in_features=6, hidden=(8,))
  kx, ky = jax.random.split(jax.random.key(3))
  batch = {'x': jax.random.normal(kx, (16, 6)), 'label': jax.random.randint(ky, (16,), 0, 4)}
  loss = lambda logits, labels, step: optax.softmax_cross_entropy_with_integer_labels(
      logits, labels)
  return model, params, stats, batch, loss


def _run(model, params, stats, batch, loss, direction, running_stats, **kw):
  tx = optax.chain(direction, optax.sgd(0.1))
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss=loss,
                                   running_stats=running_stats, **kw))
  return step(init_state(params, stats, tx), batch)[0]


def test_running_stats_from_the_last_perturbed_pass():
  model, params, stats, batch, loss = _bn_setup()
  x, y = batch['x'], batch['label']
  mean_loss = lambda p: loss(model.apply(p, stats, x, train=True)[0], y, 0).mean()

  # SAM: the only perturbed pass is at w + rho g / ||g||.
  clean = _run(model, params, stats, batch, loss, ssj.sam(0.5), 'clean')
  last = _run(model, params, stats, batch, loss, ssj.sam(0.5), 'last_perturbed')
  perturbed = ssj.perturb(params, jax.grad(mean_loss)(params), 0.5)
  chex.assert_trees_all_close(last.batch_stats, model.apply(perturbed, stats, x, True)[1],
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(clean.batch_stats, model.apply(params, stats, x, True)[1],
                              rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(last.batch_stats)[0],
                         jax.tree.leaves(clean.batch_stats)[0])
  # The parameters do not depend on the choice (training-mode BatchNorm).
  chex.assert_trees_all_close(last.params, clean.params, rtol=1e-6, atol=1e-7)

  # SSE-SAM stage 1: the tail's pass runs last.
  groups = np.array([0, 0, 1, 1], np.int32)
  tail = (groups[y] == 1).astype(jnp.float32)
  tail_loss = lambda p: jnp.sum(tail * loss(model.apply(p, stats, x, True)[0], y, 0)) / 16
  sse = _run(model, params, stats, batch, loss, ssj.sse_sam(0.05, 0.5, 10), 'last_perturbed',
             class_groups=groups, stage=0)
  at_tail = ssj.perturb(params, jax.grad(tail_loss)(params), 0.5)
  chex.assert_trees_all_close(sse.batch_stats, model.apply(at_tail, stats, x, True)[1],
                              rtol=1e-5, atol=1e-6)
  # SGD has no perturbed pass: the clean pass's statistics.
  sgd = _run(model, params, stats, batch, loss, ssj.sam(0.0), 'last_perturbed')
  chex.assert_trees_all_close(sgd.batch_stats, clean.batch_stats, rtol=1e-6)


def test_a_workdir_of_an_older_version_resumes_when_new_keys_keep_their_defaults():
  from sse_sam_jax.train import workdir as workdir_lib
  now = config_lib.default_config().to_dict()
  older = config_lib.default_config().to_dict()
  del older['optimizer']['sharpness_every'], older['model']['running_stats']
  defaults = config_lib.default_config().to_dict()
  assert workdir_lib.config_changes(older, now, defaults) == []
  now['optimizer']['sharpness_every'] = 4
  assert workdir_lib.config_changes(older, now, defaults) == [
      "optimizer.sharpness_every: '(absent)' -> 4"]


def test_a_workdir_of_an_older_version_refuses_a_new_default_that_changes_its_steps():
  """A run saved before ``data.pad_last_batch`` (or ``cpu_convolutions``) trained
  without it: resuming under the new default would change its steps midway, so it is
  a change; the old value resumes it."""
  from sse_sam_jax.train import workdir as workdir_lib
  now = config_lib.default_config().to_dict()
  older = config_lib.default_config().to_dict()
  del older['data']['pad_last_batch'], older['cpu_convolutions']
  defaults = config_lib.default_config().to_dict()
  assert workdir_lib.config_changes(older, now, defaults) == [
      "cpu_convolutions: 'ynnpack' -> 'eigen'", 'data.pad_last_batch: False -> True']
  now['data']['pad_last_batch'], now['cpu_convolutions'] = False, 'ynnpack'
  assert workdir_lib.config_changes(older, now, defaults) == []


def test_asam_leaves_biases_of_flax_models_unscaled():
  """NNX parameters end in a variable's ``value``: the name before it decides."""
  _, params, _ = models.create('conv1d', 10)
  marks = jax.tree_util.tree_flatten_with_path(ssj.adaptive_leaves(params))[0]
  by_name = {tuple(getattr(k, 'key', getattr(k, 'name', None)) for k in path[:-1]): m
             for path, m in marks}
  assert by_name[('bn1', 'bias')] is False and by_name[('head', 'bias')] is False
  assert by_name[('bn1', 'scale')] is True and by_name[('conv1', 'kernel')] is True


@pytest.mark.parametrize('plain,grouped', [
    ({'optimizer.name': 'sgd'},
     {'optimizer.name': 'imbsam', 'optimizer.tail_rho': 0.0, 'optimizer.normalization': 'group'}),
    ({'optimizer.name': 'imbsam', 'optimizer.tail_rho': 0.1},
     {'optimizer.name': 'imbsam', 'optimizer.tail_rho': 0.1, 'optimizer.normalization': 'group'}),
], ids=['sgd_is_imbsam_rho0', 'imbsam_batch_is_imbsam_group'])
def test_group_normalised_loss_equals_the_group_normalisation(npz, tmp_path, plain, grouped):
  """``loss.group_normalised`` reweights the loss to ``L_H/n_H + L_T/n_T`` for any optimizer:
  SGD on it trains as ImbSAM's reweighting control, and the batch-normalised group
  methods on it as their ``normalization='group'`` form."""
  runs = [trainer.train(small_config(npz, epochs=2, **extra), tmp_path / str(i), progress=False)
          for i, extra in enumerate(({**plain, 'loss.group_normalised': True}, grouped))]
  chex.assert_trees_all_close(jax.device_get(runs[0]['state'].params),
                              jax.device_get(runs[1]['state'].params), rtol=2e-5, atol=2e-6)
  plain_run = trainer.train(small_config(npz, epochs=2, **plain), tmp_path / 'p', progress=False)
  with pytest.raises(AssertionError):  # the reweighting changes the training
    chex.assert_trees_all_close(jax.device_get(plain_run['state'].params),
                                jax.device_get(runs[0]['state'].params), rtol=2e-5, atol=2e-6)
