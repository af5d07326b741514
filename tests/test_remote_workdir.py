"""A workdir on any filesystem etils.epath reaches (gs:// on TPU VMs): the run's own files
(config, lock, metric lines, plot, set-aside) go through epath. Offline, gs://bucket/ is
mapped onto a local folder with etils' mock backend; Orbax and TensorBoard reach GCS by
their own means and are not covered here."""

import json

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from sse_sam_jax.train import run_log
from sse_sam_jax.train import workdir as workdir_lib

BUCKET = 'gs://bucket/'


@pytest.fixture
def fake_gcs(tmp_path):
  """Every epath operation on gs://bucket/... lands in tmp_path/...; others pass through."""
  def local(path):
    path = str(path)
    return str(tmp_path / path[len(BUCKET):]) if path.startswith(BUCKET) else path

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def listing(fn, path):
    return fn(local(path))

  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=listing, makedirs=one,
                                mkdir=one, remove=one, rmtree=one, stat=one, rename=two,
                                replace=two):
    yield tmp_path


def test_a_gs_workdir_is_claimed_checked_and_set_aside(fake_gcs):
  config = {'optimizer': {'name': 'sse_sam', 'lr': 0.1}}
  lock = workdir_lib.claim(BUCKET + 'run', config)
  lock.release()  # no lock on an object store: the release is a no-op
  assert json.loads((fake_gcs / 'run' / 'config.json').read_text()) == config
  with pytest.raises(workdir_lib.UserError, match=r'optimizer.lr: 0.1 -> 0.2'):
    workdir_lib.claim(BUCKET + 'run', {'optimizer': {'name': 'sse_sam', 'lr': 0.2}})
  workdir_lib.claim(BUCKET + 'run', {'optimizer': {'name': 'sse_sam', 'lr': 0.2}},
                    restart=True).release()
  assert [p.name.startswith('run.old-') for p in sorted(fake_gcs.iterdir())] == [False, True]


def test_metric_lines_and_the_plot_are_written_to_a_gs_workdir(fake_gcs, monkeypatch):
  import tensorboardX
  monkeypatch.setattr(tensorboardX, 'SummaryWriter', _no_gcs_writer)
  epath.Path(BUCKET + 'run').mkdir(parents=True)
  log = run_log.MetricLog(BUCKET + 'run')  # TensorBoard cannot reach it: logged, not fatal
  assert log.tb is None and not log.local
  for step in (10, 20, 30):
    log.write(step, train_loss=1.0 / step)
  log.discard_after(20)  # a resumed run redoes step 30
  lines = [json.loads(l) for l in (fake_gcs / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines] == [10, 20]
  log.close()
  run_log.plot_per_class([0.9, 0.5, 0.1], np.array([500, 50, 5]), BUCKET + 'run/per_class.png')
  assert (fake_gcs / 'run' / 'per_class.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _no_gcs_writer(logdir):
  raise OSError(f'no GCS client for {logdir}')
