"""Where a run's time goes: timing in every log line and in results.json, and the
persistent compilation cache that spares a resumed run its compilation."""

import json

from sse_sam_jax.train import trainer
from tests.test_trainer import make_npz, small_config


def test_log_lines_and_results_say_where_the_time_went(tmp_path):
  npz = make_npz(tmp_path / 'blobs.npz')
  c = small_config(npz, **{'epochs': 2, 'log_every_steps': 2})
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
  c = small_config(npz, **{'epochs': 3, 'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.5,
                           'compilation_cache_dir': 'workdir'})
  trainer.train(c, tmp_path / 'run', progress=False, stop_after_steps=10)
  cache = tmp_path / 'run' / 'compilation_cache'
  entries = sorted(p.name for p in cache.iterdir())
  # 2 stages x 2 batch shapes of the train step, and the evaluation's predict
  assert sum(e.startswith('jit_train_step-') for e in entries) == 4, entries
  result = trainer.train(c, tmp_path / 'run', progress=False)
  assert result['compiles'] == 4
  # the resume compiled no new train step: every program came from the cache (a resume
  # also runs a small integrity check of the restored parameters)
  again = sorted(p.name for p in cache.iterdir())
  assert [e for e in again if e.startswith('jit_train_step-')] == [
      e for e in entries if e.startswith('jit_train_step-')]
  off = small_config(npz, **{'epochs': 1, 'compilation_cache_dir': ''})
  trainer.train(off, tmp_path / 'off', progress=False)
  assert not (tmp_path / 'off' / 'compilation_cache').exists()
