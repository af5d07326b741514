"""Run safety: a workdir holds one experiment and one process, a damaged checkpoint never
ends a run, and every user error is one line (exit status 2, no traceback)."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from sse_sam_jax import cli
from sse_sam_jax.train import checkpointing, periodic, resume, setup, trainer
from sse_sam_jax.train import workdir as workdir_lib
from tests.test_trainer import make_npz, small_config

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return make_npz(tmp_path_factory.mktemp('data') / 'blobs.npz')


def tiny(npz, **overrides):
  return small_config(npz, **{'epochs': 3, 'eval.every_epochs': 3, **overrides})


def run_cli(argv, capsys):
  """``sse-sam-jax ARGV`` in-process: (exit status, stdout, stderr)."""
  code = cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith('sse-sam-jax: error: '), err
  assert 'Traceback' not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def npz_args(npz):
  return ['data.name=npz', f'data.npz_path={npz}', 'data.shots=default', 'model.name=mlp',
          'optimizer.eta=50', 'epochs=2', 'data.batch_size=32', 'data.imbalance_factor=10']


# ------------------------------------------------------------------ one experiment
def test_a_changed_training_key_is_refused_and_changes_nothing(npz, tmp_path):
  trainer.train(tiny(npz), tmp_path, progress=False)
  before = {p: p.read_bytes() for p in (tmp_path / 'results.json', tmp_path / 'config.json')}
  for key, value in [('optimizer.lr', 0.5), ('epochs', 5), ('loss.name', 'ldam'), ('seed', 3)]:
    with pytest.raises(workdir_lib.UserError,
                       match=rf'holds another experiment.*{key}: .* -> .*--restart'):
      trainer.train(tiny(npz, **{key: value}), tmp_path, progress=False)
    assert {p: p.read_bytes() for p in before} == before


def test_neutral_keys_may_change_and_restart_starts_fresh(npz, tmp_path, capsys):
  first = trainer.train(tiny(npz), tmp_path, progress=False)
  again = trainer.train(tiny(npz, **{'eval.flip_tta': True, 'log_every_steps': 7,
                                     'checkpoint.keep': 3}), tmp_path, progress=False)
  assert again['already_finished'] and again['test'] == first['test']
  fresh = trainer.train(tiny(npz, **{'optimizer.lr': 0.2}), tmp_path, progress=False,
                        restart=True)
  assert fresh['test']['all'] > 0.5 and 'already_finished' not in fresh
  moved = [p for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name + '.old-')]
  assert len(moved) == 1 and (moved[0] / 'results.json').exists()  # set aside, not deleted
  assert json.loads((tmp_path / 'config.json').read_text())['optimizer']['lr'] == 0.2


def test_a_restart_keeps_the_workdirs_compilation_cache(npz, tmp_path):
  # the README's rerun (--restart) of the same config loads its programs; the run set
  # aside keeps everything else
  c = tiny(npz, compilation_cache_dir='workdir')
  first = trainer.train(c, tmp_path / 'run', progress=False)
  assert first['timing']['programs_loaded'] == 0
  again = trainer.train(c, tmp_path / 'run', progress=False, restart=True)
  assert again['timing']['programs_loaded'] == again['compiles'] > 0
  assert again['test'] == first['test']
  (old,) = tmp_path.glob('run.old-*')
  assert (old / 'results.json').exists() and not (old / 'compilation_cache').exists()


def test_a_finished_run_rerun_reports_without_building_anything(npz, tmp_path, monkeypatch):
  first = trainer.train(tiny(npz), tmp_path, progress=False)
  stamp = (tmp_path / 'results.json').stat().st_mtime_ns
  monkeypatch.setattr(setup, 'prepare', lambda c: pytest.fail('rebuilt the run'))
  again = trainer.train(tiny(npz), tmp_path, progress=False)
  assert again['table'] == first['table'] and again['train_seconds'] == first['train_seconds']
  assert (tmp_path / 'results.json').stat().st_mtime_ns == stamp


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(npz, tmp_path):
  c = tiny(npz)
  lock = workdir_lib.claim(tmp_path, c.to_dict())
  try:
    with pytest.raises(workdir_lib.UserError, match=r'in use by a running training \(pid'):
      trainer.train(c, tmp_path, progress=False)
  finally:
    lock.release()
  # a holder killed with SIGKILL: the kernel drops its lock
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from sse_sam_jax.train import workdir as w; '
       'lock = w.claim(sys.argv[1], {}); print("held", flush=True); time.sleep(60)',
       str(tmp_path / 'k')],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(workdir_lib.UserError, match='in use'):
    workdir_lib.claim(tmp_path / 'k', {})
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  workdir_lib.claim(tmp_path / 'k', {}).release()


# ------------------------------------------------------------------ damaged checkpoints
def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(step_dir: pathlib.Path, kind: str):
  state = step_dir / 'state'
  if kind == 'truncated':  # every file of the state cut in half (the largest alone may go unread)
    for f in [p for p in state.rglob('*') if p.is_file()]:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif kind == 'data_deleted':
    for p in list(state.rglob('*')):
      if p.is_file() and p.parent.name == 'd':
        p.unlink()
  elif kind == 'random_bytes':
    f = _largest_file(state)
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
  elif kind == 'meta_deleted':
    shutil.rmtree(step_dir / 'meta')


@pytest.fixture(scope='module')
def uninterrupted(npz, tmp_path_factory):
  result = trainer.train(tiny(npz), tmp_path_factory.mktemp('full'), progress=False)
  return jax.device_get(result['state'])


@pytest.mark.parametrize('kind', ['truncated', 'data_deleted', 'random_bytes', 'meta_deleted'])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_restored(
    npz, tmp_path, uninterrupted, capsys, kind):
  c = tiny(npz)
  spe = int(uninterrupted.step) // 3
  trainer.train(c, tmp_path, progress=False, stop_after_steps=2 * spe + 1)  # ckpts at 1, 2 epochs
  last = pathlib.Path(checkpointing.step_directory(tmp_path))
  assert sorted(int(p.name) for p in last.iterdir() if p.name.isdigit()) == [spe, 2 * spe]
  _damage(last / str(2 * spe), kind)
  capsys.readouterr()
  resumed = trainer.train(c, tmp_path, progress=False)
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if 'is damaged' in l]
  assert len(lines) == 1 and f'checkpoint step {2 * spe} is damaged' in lines[0], err
  assert 'another config' not in err and 'another experiment' not in err
  damaged = list((tmp_path / 'checkpoints' / 'damaged').iterdir())
  assert len(damaged) == 1 and (damaged[0] / 'kept').exists()  # kept, not deleted
  chex.assert_trees_all_equal(jax.device_get(resumed['state']), uninterrupted)


# ------------------------------------------------------------------ one-line user errors
@pytest.mark.parametrize('override,needles', [
    ('optimizer.head_rho=abc', ['optimizer.head_rho must be a number', "'abc'"]),
    ('train.epochs=2', ["unknown config key 'train.epochs'", "did you mean 'epochs'"]),
    ('optimzer.lr=0.1', ["unknown config key 'optimzer.lr'", "did you mean 'optimizer.lr'"]),
    ('optimizer.gamma=1.5', ['gamma must lie in [0, 1]']),
    ('optimizer', ["'optimizer' is not key=value"]),
])
def test_config_mistakes_are_one_line(npz, tmp_path, capsys, override, needles):
  code, _, err = run_cli(['train', '--workdir', str(tmp_path / 'w'), *npz_args(npz), override],
                         capsys)
  assert_one_line_error(code, err, *needles)
  assert not (tmp_path / 'w').exists()


def test_augmenting_inputs_that_are_not_images_is_one_line(npz, tmp_path, capsys):
  # (it failed after the compile, in the first batch, with "not enough values to unpack")
  code, _, err = run_cli(['train', '--workdir', str(tmp_path / 'w'), *npz_args(npz),
                          'data.augment=True'], capsys)
  assert_one_line_error(code, err, 'data.augment: pad-crop-flip takes images [N, H, W, C]',
                        'are [12] per example', 'data.augment=False')
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
  code, _, err = run_cli(['train', '--config', str(ROOT / 'README.md')], capsys)
  assert_one_line_error(code, err, 'is not a Python file')
  code, _, err = run_cli(['train', '--config', str(tmp_path / 'nope.py')], capsys)
  assert_one_line_error(code, err, 'not found')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  code, _, err = run_cli(['train', '--config', str(tmp_path / 'empty.py')], capsys)
  assert_one_line_error(code, err, 'has no get_config()')
  (tmp_path / 'broken.py').write_text('def get_config(:\n  pass\n')
  code, _, err = run_cli(['train', '--config', str(tmp_path / 'broken.py')], capsys)
  assert_one_line_error(code, err, 'could not be loaded (line 1): SyntaxError')
  (tmp_path / 'raises.py').write_text('import no_such_module_here\n')
  code, _, err = run_cli(['train', '--config', str(tmp_path / 'raises.py')], capsys)
  assert_one_line_error(code, err, 'could not be loaded', 'no_such_module_here')


def test_a_bare_command_line_and_zero_epochs_say_what_is_wrong(capsys):
  code, _, err = run_cli([], capsys)
  assert_one_line_error(code, err, 'name a command: train, eval, hessian or config')
  code, _, err = run_cli(['train', 'epochs=0'], capsys)
  assert_one_line_error(code, err, 'epochs must be an integer >= 1, got 0')


def test_an_unwritable_data_cache_is_said_once_not_ignored(tmp_path, monkeypatch, capsys):
  import mnist1d.data

  from sse_sam_jax.data import sources
  from sse_sam_jax.train import logs
  logs.setup('info')
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  monkeypatch.setenv('SSE_SAM_JAX_CACHE', str(blocker / 'cache'))  # under a file: unwritable
  tiny_set = {k: np.zeros((4, 3)) for k in sources.MNIST1D_KEYS}
  monkeypatch.setattr(mnist1d.data, 'make_dataset', lambda args: tiny_set)
  sources._mnist1d_raw.cache_clear()  # pylint: disable=protected-access
  try:
    raw = sources._mnist1d_raw(17, 3, 0.5)  # pylint: disable=protected-access
  finally:
    sources._mnist1d_raw.cache_clear()  # pylint: disable=protected-access
  assert raw['x'].shape == (4, 3)
  err = capsys.readouterr().err
  assert 'cannot write' in err and 'SSE_SAM_JAX_CACHE' in err, err


def _bad_npz(path, kind):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(200, 12)).astype(np.float32), np.repeat(np.arange(4), 50)
  if kind == 'wrong_keys':
    np.savez(path, inputs=x, labels=y)
  elif kind == 'negative_label':
    y = y.copy()
    y[3] = -1
    np.savez(path, x=x, y=y)
  elif kind == 'mismatched_lengths':
    np.savez(path, x=x, y=y[:150])
  elif kind == 'nan_inputs':
    x[7, 2] = np.nan
    np.savez(path, x=x, y=y)
  elif kind == 'empty_class':
    np.savez(path, x=x, y=np.where(y == 2, 3, y))
  elif kind == 'not_npz':
    path.write_text('hello')
  elif kind == 'huge_label':  # max + 1 classes would allocate gigabytes: refused first
    y = y.copy()
    y[5] = 10 ** 9
    np.savez(path, x=x, y=y)
  elif kind == 'many_missing_classes':  # a long list of classes is shortened
    np.savez(path, x=x, y=np.where(y == 3, 40, y))
  elif kind == 'empty_arrays':
    np.savez(path, x=x[:0], y=y[:0])
  elif kind == 'one_class':
    np.savez(path, x=x, y=np.zeros_like(y))
  return path


@pytest.mark.parametrize('kind,needle', [
    ('wrong_keys', "it needs inputs 'x' and labels 'y'"),
    ('negative_label', 'labels must be >= 0'),
    ('mismatched_lengths', 'one row per example'),
    ('nan_inputs', 'NaN or Inf inputs'),
    ('empty_class', 'have no training example'),
    ('not_npz', 'not a readable .npz'),
    ('huge_label', 'labels go up to 1000000000 but only 5 distinct values occur'),
    ('many_missing_classes', 'more] (37 of 41) have no training example'),
    ('empty_arrays', 'the file has no examples'),
    ('one_class', 'a classifier needs at least 2 classes'),
])
def test_data_mistakes_are_one_line(tmp_path, capsys, kind, needle):
  path = _bad_npz(tmp_path / 'bad.npz', kind)
  args = [a for a in npz_args(path) if not a.startswith('data.imbalance_factor')]
  if kind == 'many_missing_classes':
    args.append('data.num_classes=41')
  code, _, err = run_cli(['train', '--workdir', str(tmp_path / 'w'), *args,
                          'data.imbalance_factor=1'], capsys)
  assert_one_line_error(code, err, needle)
  assert len(err) < 600, err  # lists in messages are shortened


def test_a_huge_label_with_num_classes_set_is_taken_as_meant(tmp_path):
  from sse_sam_jax.data import sources
  path = _bad_npz(tmp_path / 'few.npz', 'many_missing_classes')  # labels 0, 1, 2, 40
  data = sources.npz_long_tail(path, num_classes=41, test_fraction=0.5)
  assert data.train.num_classes == 41
  with pytest.raises(ValueError, match='out of range for data.num_classes=10'):
    sources.npz_long_tail(path, num_classes=10)


def test_subsampling_long_tailed_data_again_says_how_to_keep_them(tmp_path, capsys):
  x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
  y = np.repeat(np.arange(4), [200, 60, 30, 10])  # long-tailed already
  np.savez(tmp_path / 'lt.npz', x=x, y=y)
  args = [a for a in npz_args(tmp_path / 'lt.npz') if not a.startswith('data.imbalance_factor')]
  code, _, err = run_cli(['train', '--workdir', str(tmp_path / 'w'), *args,
                          'data.imbalance_factor=100'], capsys)
  assert_one_line_error(code, err, 'data.imbalance_factor=1 keeps them')


def test_missing_dataset_is_one_line_with_a_command_that_works_here(tmp_path, capsys):
  code, _, err = run_cli(['train', '--config', 'cifar10_lt_ssesam',
                          '--workdir', str(tmp_path / 'w'), f'data.data_dir={tmp_path}'], capsys)
  assert_one_line_error(code, err, "pip install 'sse-sam-jax[prepare]'",
                        'tfds build cifar10', '--file_format=array_record')


def test_an_unusable_workdir_is_one_line(npz, tmp_path, capsys):
  (tmp_path / 'a_file').write_text('')
  code, _, err = run_cli(['train', '--workdir', str(tmp_path / 'a_file' / 'run'),
                          *npz_args(npz)], capsys)
  assert_one_line_error(code, err, 'cannot use', 'as a workdir')


def test_debug_shows_the_traceback(npz, tmp_path):
  with pytest.raises(ValueError, match='must be a number'):
    cli.main(['train', '--debug', '--workdir', str(tmp_path), *npz_args(npz),
              'optimizer.head_rho=abc'])


@pytest.mark.parametrize('command', ['eval', 'hessian'])
def test_eval_and_hessian_without_checkpoints_fail_first_and_write_nothing(
    npz, tmp_path, capsys, monkeypatch, command):
  monkeypatch.setattr(setup, 'prepare', lambda c: pytest.fail('built the run first'))
  code, _, err = run_cli([command, '--workdir', str(tmp_path / 'missing'), *npz_args(npz)],
                         capsys)
  assert_one_line_error(code, err, 'no checkpoint in', 'train first')
  assert not (tmp_path / 'missing').exists()


def test_nan_stop_without_a_checkpoint_says_so_and_does_not_hold_the_workdir(
    npz, tmp_path, uninterrupted, capsys):
  """A run that never reached its first checkpoint does not hold the workdir: the rerun
  with a lower learning rate starts fresh there (one line says so, the failed start is
  moved aside), and trains as if the failed start had never been."""
  work = tmp_path / 'run'
  c = tiny(npz, **{'optimizer.lr': 1e30, 'optimizer.schedule': 'constant'})
  with pytest.raises(periodic.NonFiniteLossError, match='no checkpoint was written yet'):
    trainer.train(c, work, progress=False)
  assert (work / 'config.json').exists() and not resume.has_checkpoint(work)
  capsys.readouterr()
  fixed = trainer.train(tiny(npz), work, progress=False)
  moved = [l for l in capsys.readouterr().out.splitlines() if 'never reached a checkpoint' in l]
  assert len(moved) == 1 and 'optimizer.lr' in moved[0], moved
  assert [p.name.startswith('run.old-') for p in tmp_path.iterdir() if p.name != 'run'] == [True]
  chex.assert_trees_all_equal(jax.device_get(fixed['state']), uninterrupted)
  # a run that did reach a checkpoint still holds its workdir
  with pytest.raises(workdir_lib.UserError, match='holds another experiment'):
    trainer.train(tiny(npz, **{'optimizer.lr': 0.01}), work, progress=False)


# ------------------------------------------------------------------ preemption
@pytest.mark.slow
@pytest.mark.parametrize('sig,code,name', [(signal.SIGTERM, 143, 'SIGTERM'),
                                           (signal.SIGINT, 130, 'Ctrl-C')])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_the_rerun_resumes_exactly(
    npz, tmp_path, sig, code, name):
  """A real SIGTERM (a preempted VM) or Ctrl-C mid-epoch: the run checkpoints the current
  step and exits 143 / 130 with one line and no traceback; rerunning the same command
  ends with the uninterrupted run's results."""
  args = [*npz_args(npz), 'epochs=6', 'log_every_steps=2', 'checkpoint.every_epochs=3',
          f'compilation_cache_dir={tmp_path / "xla_cache"}']  # the 3 runs compile once
  cmd = [sys.executable, '-m', 'sse_sam_jax.cli', 'train', '--no-progress']
  full = subprocess.run([*cmd, '--workdir', str(tmp_path / 'full'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-2000:]
  work = tmp_path / 'preempted'
  proc = subprocess.Popen([*cmd, '--workdir', str(work), *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = work / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if len(lines) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == code, (out[-1000:], err[-2000:])
  assert f'{name}: checkpoint saved at step' in out and 'Traceback' not in err, err[-2000:]
  saved = int(out.split(f'{name}: checkpoint saved at step ')[1].split()[0])
  logged = [json.loads(l)['step'] for l in metrics.read_text().splitlines()]
  assert saved >= max(logged)  # the step it stopped at, not an earlier epoch's end
  assert (checkpointing.step_directory(work) / str(saved)).exists()
  again = subprocess.run([*cmd, '--workdir', str(work), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f'Resumed from step {saved}' in again.stdout
  want = json.loads((tmp_path / 'full' / 'results.json').read_text())
  got = json.loads((work / 'results.json').read_text())
  assert got['test']['confusion'] == want['test']['confusion']
  assert got['test']['all'] == want['test']['all']
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  full_metrics = (tmp_path / 'full' / 'metrics.jsonl').read_text()
  full_lines = [json.loads(l) for l in full_metrics.splitlines()]
  # the resumed epoch logs at the uninterrupted run's steps, plus the one it stopped at;
  # every interval after the first boundary past that step has the same loss
  steps, full_steps = [l['step'] for l in lines], [l['step'] for l in full_lines]
  assert sorted(set(steps)) == sorted(set(full_steps) | {saved}), (steps, full_steps)
  loss = {l['step']: l['train_loss'] for l in lines if 'train_loss' in l}
  full_loss = {l['step']: l['train_loss'] for l in full_lines if 'train_loss' in l}
  later = [s for s in sorted(full_loss) if s > saved][1:]
  assert later and all(loss[s] == full_loss[s] for s in later)


def test_a_workdir_of_the_two_manager_layout_resumes_and_evaluates_its_best(
    npz, tmp_path, uninterrupted):
  """A run saved by the earlier layout (``checkpoints/last/`` without metrics and
  ``checkpoints/best/`` with them, one manager each) resumes to the uninterrupted run's
  state and keeps its best checkpoint readable. The old layout is made from a run of
  the current one: each step folder holds the same items, only the folders differ."""
  c = tiny(npz)
  c.eval.select_on, c.eval.every_epochs = 'test', 1
  spe = int(uninterrupted.step) // 3
  trainer.train(c, tmp_path, progress=False, stop_after_steps=2 * spe + 1)
  root = tmp_path / 'checkpoints'
  best = checkpointing.Checkpoints(tmp_path).best_step()
  assert best in (spe, 2 * spe)
  (root / 'best').mkdir()
  shutil.copytree(root / 'steps' / str(best), root / 'best' / str(best))
  for step_dir in (root / 'steps').iterdir():
    shutil.rmtree(step_dir / 'metrics', ignore_errors=True)  # last/ had no metrics
  (root / 'steps').rename(root / 'last')
  assert checkpointing.step_directory(tmp_path) == root / 'last'
  old = checkpointing.Checkpoints(tmp_path)
  assert old.best_step() == best and old.legacy_best is not None
  old.close()
  resumed = trainer.train(c, tmp_path, progress=False)
  chex.assert_trees_all_equal(jax.device_get(resumed['state'].params), uninterrupted.params)
  assert not (root / 'steps').exists()  # continued in place
  _, model, meta = resume.restore_model(c, tmp_path, 'best')
  assert meta['checkpoint'] == 'best' and int(model['step']) >= best


def test_inputs_of_another_rank_than_the_model_takes(tmp_path, capsys):
  """A conv1d takes [N, L] or [N, L, channels] (channels-last signals now train); other
  ranks, and non-images for the ResNets, are one line naming the shape it takes."""
  assert setup.input_kwargs('conv1d', (10, 40), 'd') == {'in_channels': 1}
  assert setup.input_kwargs('conv1d', (10, 40, 3), 'd') == {'in_channels': 3}
  assert setup.input_kwargs('mlp', (10, 4, 5), 'd') == {'in_features': 20}
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 40)
  np.savez(tmp_path / 'chan.npz', x=rng.normal(size=(160, 16, 2)).astype(np.float32), y=y)
  c = small_config(tmp_path / 'chan.npz', **{'model.name': 'conv1d', 'epochs': 1,
                                             'data.imbalance_factor': 4.0, 'optimizer.eta': 20.0})
  result = trainer.train(c, tmp_path / 'chan', progress=False)
  assert result['test']['all'] >= 0
  np.savez(tmp_path / 'img.npz', x=rng.normal(size=(160, 4, 4, 2, 2)).astype(np.float32), y=y)
  args = [a for a in npz_args(tmp_path / 'img.npz')
          if not a.startswith(('data.imbalance', 'model.name', 'optimizer.eta'))]
  for model, needle in (('conv1d', 'takes signals [N, L] or [N, L, channels]'),
                        ('resnet32', 'takes images [N, H, W, C]')):
    code, _, err = run_cli(['train', '--workdir', str(tmp_path / model), *args,
                            f'model.name={model}', 'data.imbalance_factor=4',
                            'optimizer.eta=20'], capsys)
    assert_one_line_error(code, err, needle, '[4, 4, 2, 2] per example')


def test_a_full_disk_is_one_line_naming_the_intact_checkpoint(npz, tmp_path, capsys,
                                                              monkeypatch, uninterrupted):
  """A full disk while saving (Orbax wraps ENOSPC) ends the run with one line that says so
  and names the intact checkpoint; the rerun, with space again, resumes from it and ends
  as the uninterrupted run does."""
  c = tiny(npz)
  spe = int(uninterrupted.step) // 3
  trainer.train(c, tmp_path / 'run', progress=False, stop_after_steps=spe + 1)  # epoch 1 saved
  real_save = checkpointing.Checkpoints.save

  def full(self, step, *args, **kwargs):
    raise RuntimeError('Orbax save failed') from OSError(28, 'No space left on device')

  monkeypatch.setattr(checkpointing.Checkpoints, 'save', full)
  with pytest.raises(periodic.DiskFullError,
                     match=f'the disk is full.*the checkpoint of step {spe} is intact'):
    trainer.train(c, tmp_path / 'run', progress=False)
  code, _, err = run_cli(['train', '--workdir', str(tmp_path / 'cli'), '--no-progress',
                          *npz_args(npz)], capsys)
  assert_one_line_error(code, err, 'the disk is full', 'no earlier checkpoint exists',
                        'rerun the same command to resume')
  monkeypatch.setattr(checkpointing.Checkpoints, 'save', real_save)
  resumed = trainer.train(c, tmp_path / 'run', progress=False)
  chex.assert_trees_all_equal(jax.device_get(resumed['state']), uninterrupted)
