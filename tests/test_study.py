"""The study's runner and report (experiments/): every queued run has a valid config,
run names round-trip, the radius is chosen on validation only, claims are exclusive and
a dead worker's claim is taken over, and the paired statistics match a hand computation."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
import study  # pylint: disable=wrong-import-position
import study_report  # pylint: disable=wrong-import-position

from sse_sam_jax.train import config as config_lib  # pylint: disable=wrong-import-position


def test_every_queued_run_has_a_valid_config():
  names = {(s, r) for s, r, _ in study.jobs(study.PARTS)} | {
      ('B', study.config_name(m, scale, g)) for m in study.TUNED
      for scale in study.RADIUS_SCALES for g in (None,) + study.GAMMAS}
  for setting, run in names:
    c = study.config_for(setting, run, seed=3)
    config_lib.validate(c)
    assert c.seed == 3 and c.data.val_generated == 12500
    assert c.model.init == ('flax' if run.endswith('flax_init') else 'torch')


@pytest.mark.parametrize('method,scale,gamma', [('sam', 1.0, None), ('sse_sam', 0.5, 0.9),
                                                ('imbsam_gn', 2.0, None)])
def test_run_names_round_trip_and_scale_the_reference_radii(method, scale, gamma):
  name = study.config_name(method, scale, gamma)
  assert study.parse_name(name) == (method, scale, gamma)
  _, extra = study.overrides(name)
  for key, value in study.METHODS[method][2].items():
    assert extra[key] == pytest.approx(value * scale)
  assert extra.get('optimizer.gamma') == gamma


def _fake_result(root, setting, run, seed, val, test_all):
  path = study.result_path(setting, run, seed, root)
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({'val': {'balanced': val}, 'test': {'all': test_all}}))


def test_the_radius_is_chosen_on_validation_never_on_test(tmp_path, monkeypatch):
  monkeypatch.setattr(study, 'RUNS_DIR', tmp_path)
  monkeypatch.setattr(study, 'result_path',
                      lambda s, r, k, root=tmp_path: root / s / r / f'seed{k}' / 'results.json')
  assert study.chosen_scale('B', 'sam') is None  # nothing trained yet
  for scale, val, test in ((0.5, 0.70, 0.90), (1.0, 0.72, 0.10), (2.0, 0.71, 0.95)):
    for seed in study.TUNE_SEEDS:
      _fake_result(tmp_path, 'B', study.config_name('sam', scale), seed, val, test)
  assert study.chosen_scale('B', 'sam') == 1.0  # best validation, worst test
  finals = [j for j in study.jobs(['final']) if j[1].startswith('sam')]
  assert {run for _, run, _ in finals} == {'sam'} and len(finals) == len(study.FINAL_SEEDS)


def test_a_claim_is_exclusive_and_a_dead_workers_claim_is_taken_over(tmp_path):
  workdir = tmp_path / 'run'
  assert study.claim(workdir)
  assert not study.claim(workdir)  # held by a live process (this one)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (workdir / '.claim').write_text(str(dead.pid))
  assert study.claim(workdir)
  assert (workdir / '.claim').read_text() == str(os.getpid())


def test_paired_statistics_match_a_hand_computation():
  a = [71.0, 70.2, 70.9, 71.5, 70.0]
  b = [70.5, 70.4, 70.1, 70.9, 69.5]
  runs = {'x': {s: {'few': v} for s, v in enumerate(a)},
          'y': {s: {'few': v} for s, v in enumerate(b)}}
  mean, low, high, n, better, mde = study_report.paired(runs, 'x', 'y', 'few')
  d = np.subtract(a, b)
  ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
  assert mean == pytest.approx(d.mean()) and n == 5 and better == 4
  assert (low, high) == pytest.approx((ci.low, ci.high))
  assert mde > high - mean  # (t_.975 + t_.8) > t_.975
  assert study_report.paired(runs | {'z': {9: {'few': 1.0}}}, 'x', 'z', 'few') is None
