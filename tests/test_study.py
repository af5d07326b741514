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
  mean, low, high, n, better, mde, p = study_report.paired(runs, 'x', 'y', 'few')
  d = np.subtract(a, b)
  ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
  assert mean == pytest.approx(d.mean()) and n == 5 and better == 4
  assert p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
  assert (low, high) == pytest.approx((ci.low, ci.high))
  assert mde > high - mean  # (t_.975 + t_.8) > t_.975
  assert study_report.paired(runs | {'z': {9: {'few': 1.0}}}, 'x', 'z', 'few') is None


def test_the_comparison_parts_have_their_own_csvs_and_merge_keeps_committed_rows(
    tmp_path, monkeypatch):
  assert study.csv_path('B', 'imbsam_gn@x0@every').name == 'bn_passes_B.csv'
  assert study.csv_path('B', 'sse_sam@bf16').name == 'bf16_B.csv'
  assert study.csv_path('B', 'sse_sam').name == 'study_B.csv'
  assert study.overrides('imbsam_gn@x0@clean')[1] == {
      'optimizer.name': 'imbsam', 'optimizer.normalization': 'group',
      'optimizer.tail_rho': 0.0, 'model.running_stats': 'clean'}
  # a committed row of a run not on this machine stays; a finished local run replaces its own
  results = tmp_path / 'results'
  monkeypatch.setattr(study, 'RESULTS', results)
  monkeypatch.setattr(study, 'RUNS_DIR', results / 'runs')
  results.mkdir()
  committed = [dict(setting='B', run='sgd', seed=s, few=1.0 + s) for s in (0, 1)]
  study.write_csv(results / 'study_B.csv', committed, study.CSV_FIELDS)
  local = results / 'runs' / 'B' / 'sgd' / 'seed1'
  local.mkdir(parents=True)
  metrics = dict(many=0.9, medium=0.7, few=0.5, all=0.8, balanced=0.75, per_class=[])
  provenance = {'run_id': 'abc123', 'versions': {'jax': '9.9'}, 'python': '3.12',
                'device_kind': 'cpu', 'cpu_model': 'Some CPU', 'device_count': 1}
  (local / 'results.json').write_text(json.dumps(
      dict(test=metrics, val=metrics, train_seconds=1.0, provenance=provenance)))
  study.write_study_csvs()
  rows = study.read_rows(results / 'study_B.csv')
  assert [(r['seed'], r['few']) for r in rows] == [('0', '1.0'), ('1', '50.0')]
  assert rows[1]['run_id'] == 'abc123' and 'jax 9.9' in rows[1]['environment']
  assert rows[0]['run_id'] == ''  # made before results.json recorded provenance


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('SSE_SAM_JAX_REPRODUCE_STUDY'),
                    reason='40 s of training; set SSE_SAM_JAX_REPRODUCE_STUDY=1 (it runs where '
                           "the row's environment is this one)")
def test_a_committed_study_row_reproduces_exactly_in_its_environment(tmp_path):
  """``study.py reproduce``: a row of the committed CSVs, rerun, gives every metric to the
  last digit when the environment (library versions, CPU, XLA flags) is the row's."""
  run, seed = 'imbsam_gn@x0@clean', 1
  rows = [r for r in study.read_rows(study.csv_path('B', run))
          if r['run'] == run and int(r['seed']) == seed]
  assert rows and rows[0]['environment'], 'the row records its environment'
  out = study.reproduce('B', run, seed, tmp_path / 'run')
  if out['environment'] != out['committed_environment']:
    pytest.skip(f"another environment: {out['environment']} (the row's: "
                f"{out['committed_environment']})")
  assert out['same'], out['differences']
