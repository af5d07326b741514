"""End-to-end training: every optimizer, resume, bad configs, NaN stop, 8 fake devices."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
import pytest

from sse_sam_jax.train import commands, periodic, setup, trainer
from sse_sam_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).parents[1]
# One persistent compilation cache per test process: the many small runs of the suite
# compile the same programs (tests of the per-workdir default set it themselves).
TEST_CACHE = tempfile.mkdtemp(prefix='sse_sam_jax_xla_cache_')


def make_npz(path, n_per_class=160, classes=4, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim)) * 1.5
  y = np.repeat(np.arange(classes), n_per_class)
  x = centers[y] + rng.normal(size=(len(y), dim))
  np.savez(path, x=x.astype(np.float32), y=y)
  return path


def small_config(npz, **overrides):
  c = config_lib.default_config()
  c.epochs = 3
  c.data.name = 'npz'
  c.data.npz_path = str(npz)
  c.data.imbalance_factor = 10.0
  c.data.batch_size = 32
  c.data.shots = 'default'
  c.model.name = 'mlp'
  c.optimizer.eta = 50.0
  c.optimizer.lr = 0.05
  c.eval.every_epochs = 1
  c.checkpoint.every_epochs = 1
  c.log_every_steps = 3
  c.compilation_cache_dir = TEST_CACHE
  return set_keys(c, **overrides)


def set_keys(c, **overrides):
  """``c`` with dotted keys set: ``set_keys(c, **{'optimizer.lr': 0.1})``."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return make_npz(tmp_path_factory.mktemp('data') / 'blobs.npz')


@pytest.mark.parametrize('optimizer', ['sgd', 'sam', 'imbsam', 'group_sam', 'sse_sam',
                                       'sam_then_imbsam'])
def test_end_to_end_each_optimizer(npz, tmp_path, optimizer):
  # gamma 0.5: the switch at epoch 2 of 3, so the two-stage methods run both stages;
  # sam_then_imbsam runs its last batches unpadded, in programs of their own
  pads = optimizer != 'sam_then_imbsam'
  c = small_config(npz, **{'optimizer.name': optimizer, 'optimizer.gamma': 0.5,
                           'data.pad_last_batch': pads})
  result = trainer.train(c, tmp_path, progress=False)
  test = result['test']
  assert test['all'] > 0.5  # separable blobs: it learns
  saved = json.loads((tmp_path / 'results.json').read_text())
  # Many/Medium/Few are means of the per-class accuracies over the shot groups of the
  # training counts (128, 59, 27, 12 at IF 10: Many > 100, Few < 20)
  counts, per_class = np.asarray(saved['class_counts']), np.asarray(test['per_class'])
  assert counts.tolist() == [128, 59, 27, 12]
  assert test['many'] == pytest.approx(per_class[counts > 100].mean())
  assert test['medium'] == pytest.approx(per_class[(counts >= 20) & (counts <= 100)].mean())
  assert test['few'] == pytest.approx(per_class[counts < 20].mean())
  confusion = np.asarray(test['confusion'])
  assert test['all'] == pytest.approx(np.trace(confusion) / confusion.sum())
  assert saved['test']['all'] == test['all']
  assert (tmp_path / 'per_class_accuracy.png').exists()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert any('test_all' in l for l in lines) and any('train_loss' in l for l in lines)
  assert '| Many | Medium | Few | All |' in result['table'].replace('| run ', '')
  # one program per (stage, batch shape), all compiled before step 0, none after; the
  # epoch's last 2 examples run padded in the 32-example batches' program
  # (data.pad_last_batch) or in their own
  stages = 2 if optimizer in ('sse_sam', 'sam_then_imbsam') else 1
  assert result['compiles'] == stages * (1 if pads else 2)


def test_losses_run(npz, tmp_path):
  for i, loss in enumerate(['ldam', 'logit_adjusted', 'vs']):
    c = small_config(npz, **{'loss.name': loss, 'loss.drw_epoch': 1, 'epochs': 2,
                             'model.normed_classifier': loss == 'ldam'})
    result = trainer.train(c, tmp_path / str(i), progress=False)
    assert result['test']['all'] > 0.5, loss  # separable blobs: each loss learns
    metrics = (tmp_path / str(i) / 'metrics.jsonl').read_text()
    records = [json.loads(l) for l in metrics.splitlines()]
    train_loss = [r['train_loss'] for r in records if 'train_loss' in r]
    assert train_loss[-1] < train_loss[0], (loss, train_loss)


def test_resume_after_interruption_is_bit_identical(npz, tmp_path):
  c = small_config(npz, **{'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.5, 'epochs': 4})
  full = trainer.train(c, tmp_path / 'full', progress=False)
  steps_per_epoch = full['state'].step // 4
  # killed in the middle of epoch 3, after the checkpoint of epoch 2 and the stage switch
  stopped = trainer.train(c, tmp_path / 'cut', progress=False,
                          stop_after_steps=int(2 * steps_per_epoch + 2))
  assert stopped['stopped_at'] == 2 * steps_per_epoch + 2
  resumed = trainer.train(c, tmp_path / 'cut', progress=False)
  chex.assert_trees_all_equal(jax.device_get(resumed['state']), jax.device_get(full['state']))
  assert resumed['test'] == full['test']


@pytest.mark.parametrize('key,value,match', [
    ('optimizer.name', 'adamw', 'unknown optimizer'),
    ('loss.name', 'focal', 'unknown loss'),
    ('data.name', 'mnist2d', 'unknown dataset'),
    ('optimizer.lr', -0.1, 'lr must be > 0'),
    ('optimizer.gamma', 1.5, r'gamma must lie in \[0, 1\]'),
    ('optimizer.tail_rho', -0.1, 'tail_rho must be >= 0'),
    ('eval.select_on', 'val', 'val_fraction > 0'),
    ('data.val_generated', 500, 'is for mnist1d'),
    ('model.init', 'kaiming', 'model.init must be one of'),
    ('optimizer.normalization', 'group', None),  # + loss.group_normalised below
])
def test_bad_config_rejected_before_compiling(npz, tmp_path, key, value, match):
  overrides = {key: value}
  if match is None:
    overrides['loss.group_normalised'], match = True, 'normalises twice'
  with pytest.raises(ValueError, match=match):
    trainer.train(small_config(npz, **overrides), tmp_path, progress=False)
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('overrides,match', [
    ({'perturbation_scope': 'm-sharpness'}, 'perturbation_scope must be one of'),
    ({'perturbation_scope': 'microbatch'}, 'perturbation_microbatch must be an integer >= 1'),
    ({'perturbation_microbatch': 4}, 'and 0 otherwise'),
    ({'perturbation_scope': 'microbatch', 'perturbation_microbatch': 5},
     'does not divide data.batch_size=32'),
    # the last, smaller batch (no drop_remainder) does not split into 16s
    ({'perturbation_scope': 'microbatch', 'perturbation_microbatch': 16},
     r'per-device batches of \[\d+\] examples do not split into microbatches'),
    ({'parameter_sharding': 'zero3'}, 'parameter_sharding must be one of'),
])
def test_bad_scale_out_config_rejected(npz, tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    trainer.train(small_config(npz, **overrides), tmp_path, progress=False)
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('eta,match', [(1.0, 'no tail'), (10**6, 'no head')])
def test_eta_must_leave_head_and_tail(npz, tmp_path, eta, match):
  with pytest.raises(ValueError, match=match):
    trainer.train(small_config(npz, **{'optimizer.eta': float(eta)}), tmp_path, progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(npz, tmp_path):
  first = small_config(npz, epochs=2)
  steps = trainer.train(first, tmp_path / 'run', progress=False)['state'].step
  # continue the finished run for 2 more epochs with an absurd learning rate (a workdir
  # of another experiment is refused, so this one is made to look like one written before
  # configs were saved)
  (tmp_path / 'run' / 'config.json').unlink()
  (tmp_path / 'run' / 'results.json').unlink()
  diverge = small_config(npz, epochs=4, **{'optimizer.lr': 1e30, 'optimizer.schedule': 'constant'})
  with pytest.raises(periodic.NonFiniteLossError, match='last good checkpoint'):
    trainer.train(diverge, tmp_path / 'run', progress=False)
  from sse_sam_jax.train.checkpointing import Checkpoints
  ckpt = Checkpoints(tmp_path / 'run')
  assert ckpt.latest_step() == int(steps)
  ckpt.close()


def test_cli_main_command_smoke(npz, tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'sse_sam_jax.cli', 'train', '--workdir', str(tmp_path),
       '--no-progress', 'data.name=npz', f'data.npz_path={npz}', 'data.shots=default',
       'model.name=mlp', 'optimizer.eta=50', 'epochs=2', 'data.batch_size=32',
       'data.imbalance_factor=10', 'optimizer.name=imbsam'],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '| Many | Medium | Few | All |' in out.stdout.replace('| run ', '')
  trained = json.loads((tmp_path / 'results.json').read_text())['test']['all']
  evaluated = subprocess.run(
      [sys.executable, '-m', 'sse_sam_jax.cli', 'eval', '--workdir', str(tmp_path),
       'data.name=npz', f'data.npz_path={npz}', 'data.shots=default', 'model.name=mlp',
       'optimizer.eta=50', 'epochs=2', 'data.batch_size=32', 'data.imbalance_factor=10'],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert f'{100 * trained:.2f} |' in evaluated.stdout  # the last checkpoint is the final model
  # without the training overrides: eval reads the workdir's config.json, and its row is
  # labelled with the optimizer that trained (imbsam), overrides still applying on top
  bare = subprocess.run(
      [sys.executable, '-m', 'sse_sam_jax.cli', 'eval', '--workdir', str(tmp_path),
       'eval.flip_tta=True'], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert bare.returncode == 0, bare.stderr[-2000:]
  assert '| imbsam (last) |' in bare.stdout, bare.stdout
  plain = subprocess.run(
      [sys.executable, '-m', 'sse_sam_jax.cli', 'eval', '--workdir', str(tmp_path)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert f'{100 * trained:.2f} |' in plain.stdout, plain.stdout
  bad = subprocess.run([sys.executable, '-m', 'sse_sam_jax.cli', 'train', 'optimizer.gamma=2'],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert bad.returncode != 0 and 'gamma must lie in [0, 1]' in bad.stderr


MULTI_DEVICE_SCRIPT = r'''
import json, sys, jax, numpy as np
sys.path.insert(0, sys.argv[3])
from tests.test_trainer import small_config
from sse_sam_jax.train import trainer
out = {}
for name in ('sam', 'imbsam'):  # SSE-SAM on 8 devices against 1: test_scale_out's
  finals = []                    # save on 8 and resume on 1 (a replicated 8 -> 1 run)
  for n_dev in (8, 1):
    # (on 8 devices the sharded program is compiled in a background thread)
    c = small_config(sys.argv[1], **{'optimizer.name': name, 'num_devices': n_dev,
                                     'data.drop_remainder': True, 'epochs': 2,
                                     'optimizer.gamma': 0.5,
                                     'background_compile_threads': 2 if n_dev == 8 else 0})
    r = trainer.train(c, f'{sys.argv[2]}/{name}{n_dev}', progress=False)
    finals.append(jax.device_get(r['state'].params))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), *finals))
  out[name] = max(diffs)
print(json.dumps(out))
'''


@pytest.mark.slow
def test_eight_fake_devices_match_one_device(npz, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', MULTI_DEVICE_SCRIPT, str(npz), str(tmp_path),
                        str(ROOT)], capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  diffs = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(diffs) == {'sam', 'imbsam'}
  for name, d in diffs.items():
    assert d <= 1e-5, (name, d)


@pytest.mark.parametrize('path', sorted((ROOT / 'sse_sam_jax' / 'configs').glob('[!_]*.py')))
def test_experiment_configs_validate(path):
  from sse_sam_jax.cli import load_config
  c = load_config(str(path), [])
  config_lib.validate(c)
  datasets = {'cifar100_lt_ssesam': 'cifar100', 'cifar10_lt_ssesam': 'cifar10',
              'cifar_lt_ldam_drw': 'cifar100', 'imagenet_lt': 'imagenet_lt',
              'inaturalist2018': 'inaturalist2018', 'mnist1d_lt': 'mnist1d'}
  assert c.data.name == datasets[path.stem]
  recipes = {  # the reference recipes of method.md
      'cifar100_lt_ssesam': dict(epochs=200, batch=64, model='resnet34_cifar', lr=0.01,
                                 schedule='cosine', wd=1e-3, eta=100.0, rhos=(0.05, 0.1),
                                 gamma=0.7, flip_tta=True, loss='ce'),
      'cifar_lt_ldam_drw': dict(epochs=200, batch=128, model='resnet32', lr=0.1,
                                schedule='ldam_step', wd=2e-4, eta=100.0, rhos=(0.05, 0.1),
                                gamma=0.7, flip_tta=False, loss='ldam'),
  }
  if path.stem in recipes:
    r = recipes[path.stem]
    o = c.optimizer
    assert (c.epochs, c.data.batch_size, c.model.name, o.lr, o.schedule, o.weight_decay,
            o.eta, (o.head_rho, o.tail_rho), o.gamma, c.eval.flip_tta, c.loss.name) == (
                r['epochs'], r['batch'], r['model'], r['lr'], r['schedule'], r['wd'], r['eta'],
                r['rhos'], r['gamma'], r['flip_tta'], r['loss'])
    assert c.data.imbalance_factor == 100.0 and o.momentum == 0.9
  if path.stem == 'cifar_lt_ldam_drw':
    assert (c.loss.drw_epoch, c.loss.drw_beta, o.warmup_epochs) == (160, 0.9999, 5)


def test_schedules_follow_the_references():
  from sse_sam_jax.train import schedules
  cos = schedules.epoch_cosine(0.05, epochs=40, steps_per_epoch=97)
  np.testing.assert_allclose(float(cos(0)), 0.05 * 0.5 * (1 + np.cos(np.pi / 40)), rtol=1e-6)
  assert float(cos(39 * 97)) == pytest.approx(0.0, abs=1e-9)  # last epoch at lr 0
  ldam = schedules.ldam_step(0.1, steps_per_epoch=10)
  got = [float(ldam(e * 10)) for e in (0, 4, 5, 159, 160, 179, 180)]
  np.testing.assert_allclose(got, [0.02, 0.1, 0.1, 0.1, 0.001, 0.001, 0.00001], rtol=1e-5)


def test_hessian_callback_and_cli(npz, tmp_path):
  c = small_config(npz, **{'hessian.every_epochs': 1, 'hessian.lanczos_iters': 6,
                           'hessian.max_examples': 200, 'epochs': 2})
  result = trainer.train(c, tmp_path, progress=False)
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  hess = [r for r in records if 'hessian_tail_lambda_max' in r]
  assert len(hess) == 2
  # the last record is the final model's: recomputed independently, the same numbers
  run = setup.prepare(c)
  again = commands.head_tail_extremes(run, result['state'],
                                     commands.hessian_subset(run.data.train, 200, 0),
                                     c.optimizer.eta, 6, 0)
  for key, value in again.items():
    assert hess[-1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  assert hess[-1]['hessian_head_lambda_max'] > 0 and hess[-1]['hessian_tail_lambda_max'] > 0
  out = commands.hessian_of_checkpoint(c, tmp_path, groups='shots', lanczos_iters=8,
                                      trace_probes=3, max_examples=300)
  assert set(out['spectra']) <= {'many', 'medium', 'few'} and out['spectra']
  assert (tmp_path / 'hessian.json').exists() and (tmp_path / 'hessian_density.png').exists()
  assert 'lambda_min' in out['table']


def test_checkpoint_of_another_config_is_a_clear_error(npz, tmp_path):
  sgd = small_config(npz, **{'optimizer.name': 'sgd', 'epochs': 1})
  trained = trainer.train(sgd, tmp_path, progress=False)
  # a workdir belongs to one experiment: another optimizer is refused, naming the keys
  with pytest.raises(ValueError, match=r"holds another experiment.*optimizer\.name: 'sgd' -> "
                                       r"'sse_sam'.*--restart"):
    trainer.train(small_config(npz, **{'optimizer.name': 'sse_sam', 'epochs': 2}), tmp_path,
                  progress=False)
  # evaluating reads the model alone: any optimizer's checkpoint of the same model fits
  other = commands.evaluate_checkpoint(
      small_config(npz, **{'optimizer.name': 'sse_sam', 'perturbation_scope': 'per_device'}),
      tmp_path, which='last')
  assert other['test']['confusion'] == trained['test']['confusion']
  with pytest.raises(ValueError, match="does not fit model 'mlp' on 'npz'"):
    commands.evaluate_checkpoint(small_config(npz, **{'model.normed_classifier': True}), tmp_path)

