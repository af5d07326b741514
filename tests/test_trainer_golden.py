"""Whole training runs of the reference loop, replayed through the trainer's own path.

``tests/data/golden_trainer`` (see its README) holds float64 runs of the authors'
optimizer classes driven by their training loop on the offline benchmark's
MNIST-1D-LT: the initial weights, every epoch's batch order, every step's learning
rate and clean loss, parameters and BatchNorm running statistics at chosen steps, and
the final test logits and accuracies. Each case is replayed here through what
``sse-sam-jax train`` runs: config -> :func:`setup.prepare` (data, model, loss,
optimizer chain, stage boundaries) -> the grain pipeline -> the dispatch plan ->
:class:`CompiledTrainStep` (one program per stage) -> evaluation, with the two public
hooks a user has too: ``model.init_from`` (the reference's initial weights) and
``data.batch_order`` (its batch order); and with the reference's conventions as
options: ``model.param_dtype='float64'`` and ``model.running_stats='every_pass'``
(PyTorch updates BatchNorm's running statistics in every forward pass, perturbed ones
included, with the unbiased variance).

The tolerance is the data README's: 1e-12 relative per tensor (100-1000x what one
1e-15 perturbation of the initial weights grows to over these runs); a difference of
method is 1e-6 or more. The fast tests replay the first 10 steps of every case; the slow
ones whole runs: SSE-SAM across its stage switch through the trainer's parts,
group-normalised ImbSAM through ``trainer.train`` end to end. The other whole runs cost
25-60 s each in float64 on 2 cores (the suite's budget is 10 minutes):
``SSE_SAM_JAX_ALL_REPLAYS=1 pytest -m slow tests/test_trainer_golden.py`` runs every case
whole (all pass on an AMD EPYC, jax 0.12.0.1, 2026-12-03).
"""

import hashlib
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sse_sam_jax import data as data_lib
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import dispatch, schedules, setup, trainer
from sse_sam_jax.train import evaluate as eval_lib
from sse_sam_jax.train.compiled_step import CompiledTrainStep, compiler_options
from tests import golden_cases

DATA = pathlib.Path(__file__).parent / 'data' / 'golden_trainer'
CASES = ('t_sgd', 't_sam', 't_imbsam_group', 't_ssesam', 't_ssesam_group', 't_ssesam_switch')
RTOL = 1e-12

# the reference's PyTorch names -> the trainer's Conv1DNet (Flax layouts)
CONV = {'c1': 'conv1', 'c2': 'conv2', 'c3': 'conv3'}
NORM = {'b1': 'bn1', 'b2': 'bn2', 'b3': 'bn3'}


def load(case):
  meta = json.loads((DATA / f'{case}.json').read_text())
  with np.load(DATA / f'{case}.npz') as f:
    return meta, {k: f[k] for k in f.files}


def flax_weights(arrays, at: int) -> dict:
  """``models.save_weights``' names and layouts of the reference's snapshot ``at``."""
  out = {}
  for t, f in CONV.items():
    out[f'params/{f}/kernel'] = arrays[f'{t}.weight'][at].transpose(2, 1, 0)
    out[f'params/{f}/bias'] = arrays[f'{t}.bias'][at]
  for t, f in NORM.items():
    out[f'params/{f}/scale'] = arrays[f'{t}.weight'][at]
    out[f'params/{f}/bias'] = arrays[f'{t}.bias'][at]
    out[f'batch_stats/{f}/mean'] = arrays[f'{t}.running_mean'][at]
    out[f'batch_stats/{f}/var'] = arrays[f'{t}.running_var'][at]
  out['params/head/kernel'] = arrays['fc.weight'][at].T
  out['params/head/bias'] = arrays['fc.bias'][at]
  return out


def named(state) -> dict:
  """The state's parameters and statistics under ``flax_weights``' names."""
  pure = {'params': nnx.to_pure_dict(state.params),
          'batch_stats': nnx.to_pure_dict(state.batch_stats)}
  return {f'{kind}/{layer}/{leaf}': np.asarray(v) for kind, tree in pure.items()
          for layer, leaves in tree.items() for leaf, v in leaves.items()}


def config_for(meta, tmp_path, arrays):
  """The case's recipe as a training config, with the two hooks pointing at its files."""
  c = config_lib.default_config()
  c.seed, c.epochs = meta['seed'], meta['epochs']
  d = c.data
  gen = meta['data']['generator_args']
  d.iid_noise_scale, d.num_samples = gen['iid_noise_scale'], gen['num_samples']
  d.n_max, d.imbalance_factor = meta['data']['n_max'], 1 / meta['data']['imb_ratio']
  d.batch_size, d.drop_remainder, d.shots = meta['batch_size'], meta['drop_last'], 'mnist1d'
  m = c.model
  m.name, m.init, m.param_dtype, m.running_stats = 'conv1d', 'torch', 'float64', 'every_pass'
  o = c.optimizer
  o.lr, o.momentum = meta['optimizer']['lr'], meta['optimizer']['momentum']
  o.weight_decay, o.schedule, o.eta = meta['optimizer']['weight_decay'], 'cosine', meta['eta']
  h = meta.get('method_hparams', {})
  o.name = {'sgd': 'sgd', 'sam': 'sam', 'imbsam': 'imbsam', 'ssesam': 'sse_sam',
            'ssesam_gb': 'sse_sam'}[meta['method']]
  o.rho = h.get('rho', 0.0)
  o.head_rho, o.tail_rho = h.get('head_rho', 0.0), h.get('tail_rho', h.get('rho', 0.0))
  o.gamma = h.get('gamma', 1.0)
  o.normalization = 'group' if meta['loss_normalisation'].startswith('group') else 'batch'
  c.steps_per_dispatch, c.compilation_cache_dir = 1, ''
  c.eval.select_on = 'none'
  weights, order = tmp_path / 'init.npz', tmp_path / 'order.npy'
  np.savez(weights, **flax_weights(arrays, 0))
  np.save(order, arrays['batch_order'])
  m.init_from, d.batch_order = str(weights), str(order)
  config_lib.validate(c)
  return c


def check_data(meta, arrays, run):
  """The long-tailed data are the reference's, to the bit (its sha256 digests)."""
  digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
  train, test = run.data.train, run.data.test
  assert train.x.dtype == np.float64
  assert digest(train.x) == meta['data']['sha256_x_train_f64']
  assert digest(test.x) == meta['data']['sha256_x_test_f64']
  assert digest(test.label.astype(np.int64)) == meta['data']['sha256_y_test_i64']
  np.testing.assert_array_equal(train.label, arrays['y_train'])
  assert run.stats.counts.tolist() == meta['data']['lt_train_per_class']


def rel_l2(got, want) -> float:
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def compare_snapshot(arrays, index, state, what):
  want = flax_weights(arrays, index)
  got = named(state)
  assert set(got) == set(want)
  for name, value in want.items():
    assert got[name].dtype == np.float64, name
    err = rel_l2(got[name], value)
    assert err <= RTOL, f'{what}: {name} differs by {err:.2e} (relative L2)'


def replay(case, tmp_path, steps=None):
  """Runs ``steps`` (all) steps of the case through the trainer's parts; compares every
  snapshot on the way and returns ``(meta, arrays, run, state, compared snapshots)``."""
  meta, arrays = load(case)
  with golden_cases.enable_x64():
    c = config_for(meta, tmp_path, arrays)
    run = setup.prepare(c)
    check_data(meta, arrays, run)
    spe, total = run.steps_per_epoch, c.epochs * run.steps_per_epoch
    assert spe == meta['steps_per_epoch'] and total == len(arrays['lr'])
    steps = total if steps is None else steps
    step_fn = CompiledTrainStep(run.model, run.tx, run.loss, run.class_groups,
                                boundaries=run.boundaries, running_stats=run.running_stats,
                                compiler_options=compiler_options(c.cpu_convolutions))
    order = data_lib.load_batch_order(c.data.batch_order, c.epochs, len(run.data.train))
    batches = iter(data_lib.train_batches(run.data.train, run.spec, num_epochs=c.epochs,
                                          seed=c.seed, order=order, prefetch_batches=0))
    plan = dispatch.DispatchPlan(1, spe, run.spec.full_batches(len(run.data.train)),
                                 run.boundaries)
    lr = schedules.make(c.optimizer.schedule, c.optimizer.lr, c.epochs, spe)
    snaps = {int(s): i for i, s in enumerate(arrays['snap_steps'])}
    state, compared = run.state, [0]
    compare_snapshot(arrays, 0, state, 'initial state')
    for step, n in plan.dispatches(0, steps):
      assert n == 1
      batch = dispatch.device_batch([next(batches)], step, run)
      state, metrics = step_fn(state, batch, step)
      np.testing.assert_allclose(float(lr(step)), arrays['lr'][step], rtol=RTOL, atol=1e-18)
      loss = float(metrics['loss_sum']) / int(metrics['count'])
      np.testing.assert_allclose(loss, arrays['loss_clean'][step], rtol=RTOL,
                                 err_msg=f'clean loss of step {step + 1}')
      if step + 1 in snaps:
        compare_snapshot(arrays, snaps[step + 1], state, f'after step {step + 1}')
        compared.append(step + 1)
  return meta, arrays, run, state, compared


@pytest.mark.parametrize('case', CASES)
def test_the_first_steps_of_every_reference_run(case, tmp_path):
  _, _, run, _, compared = replay(case, tmp_path, steps=10)
  assert compared == [0, 1, 2, 5, 10]
  if case == 't_ssesam_switch':
    assert run.boundaries == [2 * run.steps_per_epoch]


def test_weights_and_orders_that_do_not_fit_are_refused(tmp_path):
  meta, arrays = load('t_sgd')
  with golden_cases.enable_x64():
    c = config_for(meta, tmp_path, arrays)
    bad = dict(flax_weights(arrays, 0))
    bad['params/head/kernel'] = bad['params/head/kernel'][:, :5]
    del bad['batch_stats/bn1/var']
    np.savez(tmp_path / 'bad.npz', **bad)
    c.model.init_from = str(tmp_path / 'bad.npz')
    with pytest.raises(ValueError, match=r'head/kernel has shape \(64, 5\).*bn1/var missing'):
      setup.prepare(c)
  order = arrays['batch_order'].astype(np.int64)
  with pytest.raises(ValueError, match=r'expected \[epochs >= 4, 12406\]'):
    data_lib.check_batch_order(order, 4, 12406)
  order[1, 0] = order[1, 1]
  with pytest.raises(ValueError, match='row 1 is not a permutation'):
    data_lib.check_batch_order(order, 3, 12406)


ALL_REPLAYS = bool(os.environ.get('SSE_SAM_JAX_ALL_REPLAYS'))
WHOLE_BY_DEFAULT = ('t_ssesam_switch',)  # (t_imbsam_group: end to end, below)


@pytest.mark.slow
@pytest.mark.parametrize('case', [
    c if c in WHOLE_BY_DEFAULT else pytest.param(c, marks=pytest.mark.skipif(
        not ALL_REPLAYS, reason='25-60 s; SSE_SAM_JAX_ALL_REPLAYS=1 runs it'))
    for c in CASES])
def test_whole_reference_runs(case, tmp_path):
  meta, arrays, run, state, compared = replay(case, tmp_path)
  assert compared == arrays['snap_steps'].tolist()
  with golden_cases.enable_x64():
    logits = run.model.apply(state.params, state.batch_stats,
                             jnp.asarray(run.data.test.x[:len(arrays['test_logits'])]),
                             train=False)[0]
    assert rel_l2(np.asarray(logits), arrays['test_logits']) <= RTOL
    predict = eval_lib.make_predict(run.model)
    acc = eval_lib.evaluate(predict, state.params, state.batch_stats, run.data.test, run.stats)
  want = dict(zip(('all', 'many', 'medium', 'few'), arrays['test_acc'].tolist()))
  for k, v in want.items():
    assert acc[k] == pytest.approx(v, abs=1e-6), k  # (the reference saved them in float32)


@pytest.mark.slow
def test_trainer_train_replays_a_reference_run_end_to_end(tmp_path):
  """``sse-sam-jax train`` with ``model.init_from`` and ``data.batch_order``: the
  group-normalised ImbSAM run, its every epoch's checkpoint and its test accuracies."""
  meta, arrays = load('t_imbsam_group')
  c = config_for(meta, tmp_path, arrays)
  c.checkpoint.keep = meta['epochs']
  result = trainer.train(c, tmp_path / 'run', progress=False)
  state = result['state']
  with golden_cases.enable_x64():
    compare_snapshot(arrays, len(arrays['snap_steps']) - 1, state, 'the end of the run')
  want = dict(zip(('all', 'many', 'medium', 'few'), arrays['test_acc'].tolist()))
  saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
  for k, v in want.items():
    assert saved['test'][k] == pytest.approx(v, abs=1e-6), k
  assert saved['config']['model']['init_from'] == c.model.init_from
