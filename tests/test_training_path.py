"""The library's own training path against the reference update rules, float64.

Every golden trajectory of the authors' optimizers (``tests/data/golden``) is
replayed through what ``sse-sam-jax train`` runs: config -> ``build_optimizer`` /
``build_loss`` -> ``CompiledTrainStep`` (static stages, one program per stage) ->
``train_step`` with its shared clean pass, weight decay, momentum and the stage
switch; the BatchNorm case through the library's MLP. DRW timing is checked
against a hand-written reference, and BatchNorm's running statistics are pinned
for one step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sse_sam_jax import data as data_lib
from sse_sam_jax import models
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import setup
from sse_sam_jax.train.compiled_step import CompiledTrainStep
from sse_sam_jax.train.step import init_state
from tests import golden_cases

METHOD_TO_OPTIMIZER = {'sgd': 'sgd', 'sam': 'sam', 'imbsam_batch': 'imbsam',
                       'imbsam_group': 'imbsam', 'ssesam': 'sse_sam'}


def config_for(meta):
  c = config_lib.default_config()
  c.epochs = meta['epochs']
  o = c.optimizer
  o.name = METHOD_TO_OPTIMIZER[meta['method']]
  o.normalization = 'group' if meta['method'] == 'imbsam_group' else 'batch'
  o.tail_weight = float(meta.get('tail_weight', 1.0))
  # each method reads its own radius keys: the others are set to 0 so that a builder
  # reading the wrong key cannot pass
  o.rho = float(meta['rho']) if meta['method'] == 'sam' else 0.0
  o.head_rho = float(meta.get('head_rho', 0.0))
  o.tail_rho = float(meta.get('tail_rho', meta.get('rho', 0.0))) if meta['method'] != 'sam' else 0.0
  o.gamma = float(meta.get('gamma', 1.0))
  o.eta = float(meta['eta'])
  o.lr, o.schedule = meta['lr'], 'constant'
  o.momentum, o.weight_decay = meta['momentum'], meta['weight_decay']
  config_lib.validate(c)
  return c


class GoldenMLP(nnx.Module):
  """The golden cases' model without BatchNorm: relu(x W1 + b1) W2 + b2."""

  def __init__(self, in_dim, hidden, classes, rngs):
    self.fc1 = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def functional(module):
  module.train()
  graph, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  module.eval()
  return models.FunctionalModel(graph, nnx.graphdef(module)), params, stats


def golden_model(meta, arrays):
  """``(FunctionalModel, params, batch_stats, to_golden)`` at the golden step-0 weights."""
  if meta['batchnorm']:
    model, params, stats = models.create('mlp', meta['classes'], in_features=meta['in_dim'],
                                         hidden=(meta['hidden'],))
    names = {'fc1_kernel': ('layers', 0, 'kernel'), 'fc1_bias': ('layers', 0, 'bias'),
             'bn_scale': ('norms', 0, 'scale'), 'bn_bias': ('norms', 0, 'bias'),
             'fc2_kernel': ('head', 'kernel'), 'fc2_bias': ('head', 'bias')}
  else:
    model, params, stats = functional(GoldenMLP(meta['in_dim'], meta['hidden'],
                                                meta['classes'], nnx.Rngs(0)))
    names = {'fc1_kernel': ('fc1', 'kernel'), 'fc1_bias': ('fc1', 'bias'),
             'fc2_kernel': ('fc2', 'kernel'), 'fc2_bias': ('fc2', 'bias')}
  pure = nnx.to_pure_dict(params)

  def setter(tree, name):
    *path, leaf = names[name]
    for p in path:
      tree = tree[p]
    return tree, leaf

  for name in names:
    node, leaf = setter(pure, name)
    node[leaf] = jnp.asarray(arrays[name][0], jnp.float64)
  nnx.replace_by_pure_dict(params, pure)
  stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), stats)

  def to_golden(params):
    pure = nnx.to_pure_dict(params)
    out = {}
    for name in names:
      node, leaf = setter(pure, name)
      out[name] = np.asarray(node[leaf])
    return out

  return model, params, stats, to_golden


def replay(meta, arrays, c, steps=None):
  stats = data_lib.ClassStats(counts=np.asarray(meta['class_counts']))
  spe = meta['steps_per_epoch']
  model, params, batch_stats, to_golden = golden_model(meta, arrays)
  tx, boundaries, _ = setup.build_optimizer(c, spe)
  loss = setup.build_loss(c, stats, spe)
  groups = None if c.optimizer.name in ('sgd', 'sam') else stats.class_groups(c.optimizer.eta)
  step_fn = CompiledTrainStep(model, tx, loss, groups, boundaries=boundaries)
  state = init_state(params, batch_stats, tx)
  batches = [{'x': jnp.asarray(arrays['x'][s]), 'label': jnp.asarray(arrays['y'][s], jnp.int32)}
             for s in range(meta['steps'] if steps is None else steps)]
  step_fn.precompile(state, [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                          batches[0])],
                     background_threads=1)  # a later stage's program: built in a thread
  trajectory = []
  for s, batch in enumerate(batches):
    state, _ = step_fn(state, batch, s)
    trajectory.append(to_golden(state.params))
  step_fn.finish_background()  # (a replay that stops before the switch never waited)
  assert step_fn.compiles == len(boundaries) + 1
  return trajectory, state


@pytest.mark.parametrize('name', golden_cases.CASES)
def test_training_path_replays_golden_trajectory(name):
  meta, arrays = golden_cases.load(name)
  with golden_cases.enable_x64():
    c = config_for(meta)
    if meta['method'] == 'ssesam':  # the trainer's switch is the authors'
      assert setup.build_optimizer(c, meta['steps_per_epoch'])[1] == [meta['switch_step']]
    trajectory, _ = replay(meta, arrays, c)
  worst = 0.0
  for s, got in enumerate(trajectory):
    for k, value in got.items():
      assert value.dtype == np.float64
      want = arrays[k][s + 1]
      err = np.max(np.abs(value - want) / np.maximum(np.abs(want), 1e-300))
      worst = max(worst, float(err))
      assert err <= 1e-12, (name, s, k, err)
  # and the parameters moved: an identity trainer cannot pass
  assert np.max(np.abs(arrays['fc1_kernel'][-1] - arrays['fc1_kernel'][0])) > 1e-3


def reference_drw_sgd(meta, arrays, drw_step, beta):
  """SGD + momentum + coupled weight decay on the class-balanced weighted mean from
  ``drw_step`` on (PyTorch's weighted mean), plain mean before; flat float64."""
  counts = np.asarray(meta['class_counts'], np.float64)
  w = (1 - beta) / (1 - beta ** counts)
  w = jnp.asarray((w / w.sum() * len(counts)).astype(np.float32), jnp.float64)
  params = golden_cases.params_at(arrays, 0)
  momentum = jax.tree.map(jnp.zeros_like, params)
  out = []
  for s in range(meta['steps']):
    x, y = jnp.asarray(arrays['x'][s]), jnp.asarray(arrays['y'][s])

    def loss(p, x=x, y=y, s=s):
      l = golden_cases.per_example_ce(p, x, y)
      if s >= drw_step:
        return jnp.sum(w[y] * l) / jnp.sum(w[y])
      return jnp.mean(l)
    g = jax.grad(loss)(params)
    momentum = jax.tree.map(lambda m, g, p: meta['momentum'] * m + g + meta['weight_decay'] * p,
                            momentum, g, params)
    params = jax.tree.map(lambda p, m: p - meta['lr'] * m, params, momentum)
    out.append({k: np.asarray(v) for k, v in params.items()})
  return out


def test_drw_switches_on_at_its_epoch_not_its_step():
  meta, arrays = golden_cases.load('mlp_sgd')
  with golden_cases.enable_x64():
    c = config_for(meta)
    c.loss.drw_epoch, c.loss.drw_beta = 2, 0.99  # epoch 2 = step 4 (2 steps per epoch)
    got, _ = replay(meta, arrays, c)
    want = reference_drw_sgd(meta, arrays, drw_step=4, beta=0.99)
    early = reference_drw_sgd(meta, arrays, drw_step=2, beta=0.99)
  for s in range(meta['steps']):
    for k in want[s]:
      np.testing.assert_allclose(got[s][k], want[s][k], rtol=1e-12, atol=1e-15)
  # the check can fail: DRW from step 2 differs from step 3 on
  assert np.max(np.abs(early[2]['fc2_kernel'] - want[2]['fc2_kernel'])) > 1e-6


def test_batchnorm_running_statistics_come_from_the_clean_pass():
  """One SSE-SAM step of the BatchNorm MLP: running mean/var = 0.9 * old + 0.1 * the
  clean pass's batch mean / (biased) variance at the unperturbed weights, whatever the
  perturbed passes saw; parameters are the golden ones (perturbed passes in training
  mode with full-batch statistics)."""
  meta, arrays = golden_cases.load('mlpbn_ssesam')
  with golden_cases.enable_x64():
    c = config_for(meta)
    trajectory, state = replay(meta, arrays, c, steps=1)
    p0 = golden_cases.params_at(arrays, 0)
    h = jnp.asarray(arrays['x'][0]) @ p0['fc1_kernel'] + p0['fc1_bias']
    want_mean = 0.1 * jnp.mean(h, axis=0)
    want_var = 0.9 * 1.0 + 0.1 * jnp.var(h, axis=0)
    stats = nnx.to_pure_dict(state.batch_stats)['norms'][0]
    np.testing.assert_allclose(stats['mean'], want_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats['var'], want_var, rtol=1e-12)
    np.testing.assert_allclose(trajectory[0]['bn_scale'], arrays['bn_scale'][1], rtol=1e-12)
    assert np.max(np.abs(want_mean)) > 1e-3 and np.max(np.abs(want_var - 1.0)) > 1e-3


def test_eval_mode_uses_the_running_statistics():
  meta, arrays = golden_cases.load('mlpbn_ssesam')
  with golden_cases.enable_x64():
    model, params, stats, _ = golden_model(meta, arrays)
    stats = jax.tree.map(lambda a: a + 0.5, stats)  # running mean 0.5, var 1.5
    x = jnp.asarray(arrays['x'][0])
    logits, same = model.apply(params, stats, x, train=False)
    p = golden_cases.params_at(arrays, 0)
    h = x @ p['fc1_kernel'] + p['fc1_bias']
    h = (h - 0.5) / jnp.sqrt(1.5 + 1e-5) * p['bn_scale'] + p['bn_bias']
    want = jax.nn.relu(h) @ p['fc2_kernel'] + p['fc2_bias']
  np.testing.assert_allclose(logits, want, rtol=1e-12)
  jax.tree.map(np.testing.assert_array_equal, same, stats)


# ---------------------------------------------------------------- the padded last batch
@pytest.mark.parametrize('overrides', [
    {},  # SSE-SAM stage 1: head and tail perturbed, group sums over B
    {'stage': 1},  # its stage 2 (ImbSAM)
    {'optimizer.name': 'sam', 'loss.name': 'ldam', 'loss.drw_epoch': 0,
     'model.normed_classifier': True, 'model.running_stats': 'last_perturbed'},
    {'optimizer.name': 'focal_sam', 'loss.group_normalised': True},
    {'optimizer.name': 'sgd'},
], ids=['sse_sam', 'sse_sam_stage2', 'sam_ldam_drw_last_perturbed', 'focal_sam_group_loss',
        'sgd'])
def test_a_padded_partial_batch_takes_the_step_of_the_partial_batch(tmp_path, overrides):
  """The epoch's last batch, padded to a full one with a mask (one program per stage),
  gives the new state and metrics of the same batch unpadded, in float64 to 1e-9:
  BatchNorm's batch and running statistics, class-weighted and group-normalised losses,
  every optimizer's means and group sums over the real examples only."""
  from sse_sam_jax.train import dispatch
  from sse_sam_jax.train.step import train_step
  from tests.test_trainer import make_npz, small_config
  overrides = dict(overrides)
  stage = overrides.pop('stage', 0)
  c = small_config(make_npz(tmp_path / 'blobs.npz'), **overrides)
  with golden_cases.enable_x64():
    run = setup.prepare(c)
    assert run.pads_last_batch and run.model.masks_padding
    state = golden_cases.as_float64(run.state)._replace(
        step=jnp.asarray(run.steps_per_epoch - 1, jnp.int32))
    rows = run.spec.batch_sizes(len(run.data.train))[-1]  # 226 % 32 = 2 examples
    # a head and a tail example, neither of class 0 (the label the padding carries): a
    # step that counted padding in the class-weight sums could not pass by coincidence
    label = run.data.train.label
    ids = np.array([np.flatnonzero(label == 1)[0], np.flatnonzero(label == label.max())[0]])
    assert len(ids) == rows and list(run.stats.class_groups(c.optimizer.eta)[label[ids]]) == [0, 1]
    partial = {'x': np.asarray(run.data.train.x[ids], np.float64),
               'label': run.data.train.label[ids].astype(np.int32), 'step': 0}
    padded = dispatch.pad(partial, c.data.batch_size, shards=1)
    assert padded['x'].shape[0] == c.data.batch_size and padded['mask'].sum() == rows
    step = jax.jit(lambda s, b: train_step(
        s, b, model=run.model, tx=run.tx, loss=run.loss, class_groups=run.class_groups,
        stage=stage if run.boundaries else None, running_stats=c.model.running_stats))
    out = {}
    for name, batch in (('partial', partial), ('padded', padded)):
      out[name] = step(jax.tree.map(jnp.copy, state),
                       {k: jnp.asarray(v) for k, v in batch.items() if k != 'step'})
  (want, want_m), (got, got_m) = out['partial'], out['padded']
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-12)
  assert int(got_m['count']) == int(want_m['count']) == rows
  assert int(got_m['correct']) == int(want_m['correct'])
  np.testing.assert_allclose(float(got_m['loss_sum']), float(want_m['loss_sum']), rtol=1e-6)
  # the test would see a step that counted the padding (its BatchNorm statistics)
  leaves = jax.tree.leaves(want.batch_stats)
  assert leaves and any(np.abs(np.asarray(a)).max() > 0 for a in leaves)
