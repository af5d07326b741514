"""Where a run's time goes: timing in every log line and in results.json, and the
persistent compilation cache and executable cache that spare a resumed run its
compilation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sse_sam_jax.train import executable_cache as executable_cache_lib
from sse_sam_jax.train import trainer
from tests.test_trainer import make_npz, set_keys, small_config


def test_log_lines_and_results_say_where_the_time_went(tmp_path):
  npz = make_npz(tmp_path / 'blobs.npz')
  c = small_config(npz, epochs=2, log_every_steps=2)
  result = trainer.train(c, tmp_path / 'run', progress=False)
  records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [r for r in records if 'train_loss' in r]
  assert train_lines
  for r in train_lines:
    assert r['step_s'] > 0 and 0.0 <= r['data_wait_frac'] <= 1.0
    # examples/s is the batch size over the step time (full batches of 32, the last 2 ex.)
    assert 0.3 * 32 / r['step_s'] <= r['examples_per_s'] <= 32 / r['step_s'] + 1e-6
  walls = [r['wall_s'] for r in train_lines]
  assert walls == sorted(walls)
  assert all('eval_seconds' in r for r in records if 'test_all' in r)
  timing = json.loads((tmp_path / 'run' / 'results.json').read_text())['timing']
  assert timing['steps'] == result['total_steps'] == 16
  assert timing['examples'] == 2 * 226
  for key in ('compile_s', 'eval_s', 'checkpoint_s', 'data_wait_s', 'loop_s'):
    assert timing[key] >= 0, key
  assert timing['eval_s'] + timing['checkpoint_s'] + timing['data_wait_s'] <= timing['loop_s']
  assert result['throughput'].startswith('throughput: ')


def test_a_resumed_run_loads_its_programs_from_the_compilation_cache(tmp_path):
  npz = make_npz(tmp_path / 'blobs.npz')
  # (the second program built in the background: a stopped run still builds and stores
  # it, and the resume loads it in the background)
  c = small_config(npz, **{'epochs': 3, 'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.5,
                           'compilation_cache_dir': 'workdir', 'background_compile_threads': 1})
  trainer.train(c, tmp_path / 'run', progress=False, stop_after_steps=10)
  cache = tmp_path / 'run' / 'compilation_cache'
  entries = sorted(p.name for p in cache.iterdir())
  # one train step program per stage (the last batch padded), and the evaluation's predict
  assert sum(e.startswith('jit_train_step-') for e in entries) == 2, entries
  executables = sorted((cache / 'executables').iterdir())
  assert len(executables) == 2
  # keys that do not change what is trained may change on a resume (README: Run safety)
  resumed = set_keys(c.copy_and_resolve_references(),
                     **{'log_every_steps': 5, 'data.prefetch_batches': 0, 'eval.every_epochs': 2})
  result = trainer.train(resumed, tmp_path / 'run', progress=False)
  assert result['compiles'] == 2
  # the resume neither traced nor compiled a train step: both came from the executable
  # cache (a resume also runs a small integrity check of the restored parameters)
  assert result['timing']['programs_loaded'] == 2
  again = sorted(p.name for p in cache.iterdir())
  assert [e for e in again if e.startswith('jit_train_step-')] == [
      e for e in entries if e.startswith('jit_train_step-')]
  assert sorted((cache / 'executables').iterdir()) == executables
  off = small_config(npz, epochs=1, compilation_cache_dir='')
  trainer.train(off, tmp_path / 'off', progress=False)
  assert not (tmp_path / 'off' / 'compilation_cache').exists()


def test_a_resumed_run_from_loaded_programs_ends_where_an_uninterrupted_run_does(tmp_path):
  npz = make_npz(tmp_path / 'blobs.npz')
  c = small_config(npz, **{'epochs': 2, 'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.5,
                           'compilation_cache_dir': str(tmp_path / 'shared_cache')})
  whole = trainer.train(c, tmp_path / 'whole', progress=False)
  trainer.train(c, tmp_path / 'cut', progress=False, stop_after_steps=5)
  resumed = trainer.train(c, tmp_path / 'cut', progress=False)
  assert resumed['timing']['programs_loaded'] == resumed['compiles'] > 0
  for a, b in zip(jax.tree.leaves(whole['state']), jax.tree.leaves(resumed['state'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_executable_cache_key_follows_the_config_and_a_damaged_file_is_recompiled(
    tmp_path, capsys):
  f = jax.jit(lambda s, b: (s * b.sum(), b.mean()), donate_argnums=(0,))
  s, b = jnp.ones(3), jnp.arange(4.0)
  compiled = f.lower(s, b).compile()
  cache = executable_cache_lib.ExecutableCache(tmp_path, {'lr': 0.1})
  assert cache.load('p', s, b) is None
  assert cache.store('p', s, b, compiled)
  loaded = cache.load('p', s, b)
  np.testing.assert_array_equal(loaded(jnp.ones(3), b)[0], compiled(jnp.ones(3), b)[0])
  # another config, program, or argument shape or dtype is another key
  other = executable_cache_lib.ExecutableCache(tmp_path, {'lr': 0.2})
  assert other.load('p', s, b) is None
  assert cache.load('q', s, b) is None
  assert cache.load('p', jnp.ones(4), b) is None
  assert cache.load('p', s, jnp.arange(4)) is None
  # a damaged file is deleted and reported; the caller compiles again
  (path,) = tmp_path.glob('*.executable')
  path.write_bytes(b'not an executable')
  assert cache.load('p', s, b) is None
  assert not path.exists()
  assert 'could not be loaded' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['xla_flags', 'source'])
def test_executable_cache_key_follows_the_environment(tmp_path, monkeypatch, name):
  s, b = jnp.ones(3), jnp.arange(4.0)
  compiled = jax.jit(lambda s, b: s * b.sum()).lower(s, b).compile()
  executable_cache_lib.ExecutableCache(tmp_path, {}).store('p', s, b, compiled)
  if name == 'xla_flags':
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=true')
  else:
    monkeypatch.setattr(executable_cache_lib, 'source_digest', lambda: 'edited source')
  assert executable_cache_lib.ExecutableCache(tmp_path, {}).load('p', s, b) is None


def test_only_executables_xla_compiled_in_this_process_are_stored(tmp_path):
  """A hit of JAX's persistent cache is a deserialized executable, and on XLA:CPU
  (jaxlib 0.12) one of those serialized again loads into a program that fails at run
  time; the trainer stores only what XLA compiled here."""
  trainer.use_compilation_cache(str(tmp_path / 'xla_cache'), tmp_path)
  def fn(s, b):
    return s * b.sum() + 1.2345
  s, b = jnp.ones(3), jnp.arange(5.0)
  lower = lambda: jax.jit(lambda s, b: fn(s, b)).lower(s, b)  # noqa: PLW0108  (a new function: a new trace each time)
  _, compiled_here = executable_cache_lib.compile_lowered(lower())
  again, compiled_here_again = executable_cache_lib.compile_lowered(lower())
  assert compiled_here and not compiled_here_again
  np.testing.assert_allclose(again(s, b), fn(s, b))


def test_plots_leave_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
  """The per-class and spectrum plots are drawn on Figures of their own: the caller's
  backend (a notebook's inline one) is not switched and no pyplot figure is left open."""
  import subprocess
  import sys
  code = r'''
import matplotlib
matplotlib.use('svg')
import matplotlib.pyplot as plt
import numpy as np
from sse_sam_jax.analysis.spectra import plot_densities
from sse_sam_jax.train.run_log import plot_per_class
plot_per_class([0.5, 0.9], [10, 100], {a!r})
density = {{'grid': np.linspace(-1, 1, 5), 'density': np.ones(5)}}
plot_densities({{'tail': {{'density': density}}}}, {b!r})
print(matplotlib.get_backend(), len(plt.get_fignums()))
'''.format(a=str(tmp_path / 'a.png'), b=str(tmp_path / 'b.png'))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['svg', '0']
  assert (tmp_path / 'a.png').read_bytes()[:4] == b'\x89PNG'
  assert (tmp_path / 'b.png').read_bytes()[:4] == b'\x89PNG'


def test_messages_go_through_logging_first_host_only_and_verbosity(capsys):
  """Information to stdout, warnings to stderr, as plain lines; --verbosity=warning hides
  information; a host other than the first shows nothing unless all_hosts."""
  import logging
  from unittest import mock

  from sse_sam_jax.train import logs
  log = logging.getLogger('sse_sam_jax.train.trainer')
  try:
    logs.setup('info')
    log.info('hello %d', 1)
    log.warning('careful')
    out = capsys.readouterr()
    assert out.out == 'hello 1\n' and out.err == 'careful\n'
    logs.setup('warning')
    log.info('hidden')
    log.warning('shown')
    out = capsys.readouterr()
    assert out.out == '' and out.err == 'shown\n'
    logs.setup('info')
    with mock.patch('jax.process_index', return_value=1):
      log.warning('second host')
      assert capsys.readouterr().err == ''
      logs.setup('info', all_hosts=True)
      log.warning('second host, all hosts')
      assert capsys.readouterr().err == 'second host, all hosts\n'
    with pytest.raises(ValueError, match='verbosity must be one of'):
      logs.setup('loud')
  finally:
    logs.setup('info')


def test_results_record_their_provenance(tmp_path):
  """results.json says what produced it: the package, the git commit of the checkout
  (dirty or not), library versions, Python, the CPU model and device kind, the XLA flags;
  the run id changes with the config."""
  import json
  import pathlib
  import subprocess

  from sse_sam_jax.train import provenance
  npz = make_npz(tmp_path / 'b.npz')
  trainer.train(small_config(npz, epochs=1), tmp_path / 'run', progress=False)
  p = json.loads((tmp_path / 'run' / 'results.json').read_text())['provenance']
  assert p['sse_sam_jax'] and p['versions']['jax'] and p['versions']['flax']
  assert p['python'] and p['cpu_model'] and p['device_kind'] and 'xla_flags' in p
  root = pathlib.Path(__file__).resolve().parents[1]
  if (root / '.git').exists():
    head = subprocess.run(['git', '-C', str(root), 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert p['git']['commit'] == head and isinstance(p['git']['dirty'], bool)
  a, b = provenance.provenance({'seed': 0}), provenance.provenance({'seed': 1})
  assert a['run_id'] != b['run_id'] and a['run_id'] == provenance.provenance({'seed': 0})['run_id']
