"""The SAM variants (issue 16) against exact SSE-SAM on the offline benchmark, setting B.

  python experiments/variants_report.py run --seeds 0 1 2 3 4 [--only sse_sam focal_sam]
  python experiments/variants_report.py

These runs use the offline benchmark's config as it stood for the first study (Flax's
default initialisation, no validation split), not the study v2 overrides, so that the
committed rows stay reproducible; they live in ``runs/variants/B``.

Writes ``experiments/results/variants_B.csv`` (one row per run and seed: the report is
computed from it alone) and ``experiments/results/VARIANTS.md``: per-method means, and
for every variant the paired difference to exact SSE-SAM over the same seeds with a
95% t-interval and the count of seeds on which the variant was better.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from study import RESULTS, VARIANTS_DIR, config_for, load, write_csv  # pylint: disable=wrong-import-position

SETTING = 'B'
REFERENCE = 'sse_sam'
VARIANT_RUNS = {
    'sse_sam_looksam2': ('SSE-SAM, perturbed passes every 2nd step, LookSAM reuse (alpha 0.7)',
                         {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 2}),
    'sse_sam_looksam5': ('SSE-SAM, perturbed passes every 5th step, LookSAM reuse (alpha 0.7)',
                         {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 5}),
    'sse_sam_fraction05': ('SSE-SAM, perturbed passes on a random half of the steps, reuse',
                           {'optimizer.name': 'sse_sam', 'optimizer.sharpness_fraction': 0.5}),
    'sse_sam_reuse2m': ('SSE-SAM, perturbed passes every 2nd step, reuse at the measured scale',
                        {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 2,
                         'optimizer.sharpness_scale': 'measured',
                         'optimizer.sharpness_alpha': 1.0}),
    'sse_sam_reuse5m': ('SSE-SAM, perturbed passes every 5th step, reuse at the measured scale',
                        {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 5,
                         'optimizer.sharpness_scale': 'measured',
                         'optimizer.sharpness_alpha': 1.0}),
    'asam_sse_sam': ('SSE-SAM with ASAM ascent steps (eta 0.01), radii 0.5/1.0 (10x, as ASAM)',
                     {'optimizer.name': 'sse_sam', 'optimizer.adaptive': True,
                      'optimizer.head_rho': 0.5, 'optimizer.tail_rho': 1.0}),
    'focal_sam': ('Focal-SAM rho 0.05, lambda 1, gamma 1 (one perturbed pass)',
                  {'optimizer.name': 'focal_sam', 'optimizer.rho': 0.05}),
    'shot_sam': ('Per-shot radii 0.05/0.075/0.1 (Many/Medium/Few; 3 perturbed passes)',
                 {'optimizer.name': 'shot_sam'}),
    'sse_sam_bn_last': ('SSE-SAM, BatchNorm running statistics from the last perturbed pass',
                        {'optimizer.name': 'sse_sam', 'model.running_stats': 'last_perturbed'}),
}
RUNS = {'sgd': ('SGD', {'optimizer.name': 'sgd'}),
        REFERENCE: ('SSE-SAM 0.05/0.1, gamma 0.7 (batch-normalised, as published)',
                    {'optimizer.name': 'sse_sam'}),
        **VARIANT_RUNS}
METHODS = ('sgd', REFERENCE) + tuple(VARIANT_RUNS)
METRICS = ('many', 'medium', 'few', 'all', 'balanced')
# Two-sided 95% quantiles of Student's t, by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
        19: 2.093, 24: 2.064, 29: 2.045}


def t_quantile(df: int) -> float:
  return T975[max(k for k in T975 if k <= df)] if df not in T975 else T975[df]


def rows_from_runs(runs) -> list[dict]:
  rows = []
  for name in METHODS:
    for seed, r in sorted(runs.get(name, {}).items()):
      test = r['test']
      timing = r.get('timing', {})
      rows.append(dict(
          setting=SETTING, run=name, description=RUNS[name][0], seed=seed,
          many=100 * test['many'], medium=100 * test['medium'], few=100 * test['few'],
          all=100 * test['all'], balanced=100 * float(np.mean(test['per_class'])),
          examples_per_s=timing.get('examples_per_s', ''), steps=timing.get('steps', '')))
  return rows


def paired(rows, variant, metric):
  """Mean paired difference (variant - reference), its 95% t-interval, n, seeds better;
  the number of paired seeds alone when there are fewer than 2."""
  ref = {r['seed']: float(r[metric]) for r in rows if r['run'] == REFERENCE}
  var = {r['seed']: float(r[metric]) for r in rows if r['run'] == variant}
  seeds = sorted(set(ref) & set(var))
  d = np.array([var[s] - ref[s] for s in seeds])
  if len(d) < 2:
    return len(d)
  half = t_quantile(len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return d.mean(), d.mean() - half, d.mean() + half, len(d), int(np.sum(d > 0))


def report(rows) -> str:
  lines = [f'# SAM variants against exact SSE-SAM (setting {SETTING})', '',
           'Computed from `variants_B.csv` alone (`python experiments/variants_report.py`).',
           'Test accuracy (%), mean over seeds; balanced = mean per-class accuracy.', '',
           '| run | seeds | Many | Medium | Few | All | balanced |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name in METHODS:
    mine = [r for r in rows if r['run'] == name]
    if not mine:
      continue
    means = [np.mean([float(r[m]) for r in mine]) for m in METRICS]
    lines.append(f'| {name} | {len(mine)} | ' + ' | '.join(f'{v:.2f}' for v in means) + ' |')
  lines += ['', f'Paired differences to `{REFERENCE}` (same seeds): mean [95% t-interval] '
            '(seeds on which the variant is better / seeds).', '',
            '| variant | ' + ' | '.join(METRICS) + ' |',
            '| --- |' + ' --- |' * len(METRICS)]
  for name in VARIANT_RUNS:
    cells = []
    for metric in METRICS:
      p = paired(rows, name, metric)
      cells.append(f'{p} paired seed(s): no interval' if isinstance(p, int) else
                   f'{p[0]:+.2f} [{p[1]:+.2f}, {p[2]:+.2f}] ({p[4]}/{p[3]})')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Runs:', ''] + [f'- `{n}`: {RUNS[n][0]}' for n in METHODS]
  return '\n'.join(lines) + '\n'


def run(seeds, only=None) -> None:
  from sse_sam_jax.train import trainer  # pylint: disable=g-import-not-at-top
  for seed in seeds:
    for name in only or METHODS:
      workdir = VARIANTS_DIR / SETTING / name / f'seed{seed}'
      if (workdir / 'results.json').exists():
        continue
      t0 = time.perf_counter()
      result = trainer.train(config_for(SETTING, name, seed, extra=RUNS[name][1], common={}),
                             workdir, progress=False)
      print(f"{name} seed {seed}: All {100 * result['test']['all']:.2f} "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('command', nargs='?', default='report', choices=('report', 'run'))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
  parser.add_argument('--only', nargs='+', default=None, choices=METHODS)
  args = parser.parse_args(argv)
  if args.command == 'run':
    run(args.seeds, args.only)
  csv_path = RESULTS / f'variants_{SETTING}.csv'
  runs = load(SETTING, VARIANTS_DIR, METHODS)
  if any(runs.get(n) for n in METHODS):  # fresh runs on disk: rewrite the table from them
    write_csv(csv_path, rows_from_runs(runs))
  with csv_path.open() as f:
    rows = [dict(r, seed=int(r['seed'])) for r in csv.DictReader(f)]
  text = report(rows)
  (RESULTS / 'VARIANTS.md').write_text(text)
  print(text)


if __name__ == '__main__':
  main()
