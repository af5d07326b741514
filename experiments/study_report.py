"""The study v2 report, computed from the committed per-seed CSVs alone.

  python experiments/study.py csv        # results.json files -> study_<setting>.csv
  python experiments/study_report.py     # study_<setting>.csv -> REPORT.md

Every comparison is paired by training seed (same initialisation and batch order): the
mean difference, its 95% t-interval, the seeds on which the first method is better, and
the minimum detectable effect (MDE) of that many seeds (two-sided 5% test, 80% power,
the observed spread of the differences). Methods with a radius are compared at the
radius chosen on the validation split (``study.chosen_scale``), never on the test set.
"""

from __future__ import annotations

import csv
import pathlib
import sys

import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from study import (  # pylint: disable=wrong-import-position
  GAMMAS,
  METHODS,
  PART_SUFFIXES,
  RADIUS_SCALES,
  RESULTS,
  TUNE_SEEDS,
  config_name,
)

METRICS = ('many', 'medium', 'few', 'all')
# The anchor: the authors' optimizers in PyTorch (shared/offline_benchmark.md), mean, std, n.
ANCHOR = {
    ('A', 'sgd'): dict(n=10, all=(92.80, 0.45), many=(99.64, 0.05), medium=(97.65, 0.18),
                       few=(78.82, 1.39)),
    ('A', 'sse_sam'): dict(n=10, all=(91.28, 0.50), many=(99.63, 0.07), medium=(98.26, 0.26),
                           few=(73.15, 1.68)),
    ('A', 'sam'): dict(n=10, all=(92.21, 0.53), many=(99.73, 0.05), medium=(97.78, 0.21),
                       few=(76.61, 1.75)),
    ('A', 'imbsam_gn'): dict(n=10, all=(96.17, 0.26), many=(99.04, 0.08), medium=(98.88, 0.17),
                             few=(89.64, 0.88)),
    ('A', 'sgd_gn'): dict(n=10, all=(95.73, 0.30), many=(99.39, 0.15), medium=(98.45, 0.22),
                          few=(88.12, 1.05)),
    ('B', 'sgd'): dict(n=3, all=(70.59, 0.50), many=(93.76, 0.09), medium=(73.56, 0.38),
                       few=(36.92, 1.77)),
    ('B', 'sam'): dict(n=3, all=(70.23, 0.29), many=(93.99, 0.34), medium=(73.48, 0.73),
                       few=(35.51, 1.26)),
    ('B', 'imbsam_gn'): dict(n=3, all=(78.68, 0.11), many=(88.85, 0.28), medium=(86.85, 0.38),
                             few=(57.15, 0.49)),
    ('B', 'sgd_gn'): dict(n=3, all=(77.21, 0.38), many=(90.22, 0.15), medium=(82.63, 0.72),
                          few=(54.67, 0.87)),
    ('B', 'sse_sam'): dict(n=3, all=(70.24, 0.42), many=(93.89, 0.11), medium=(75.28, 0.59),
                           few=(33.81, 2.03)),
    ('B', 'sse_sam_gn'): dict(n=3, all=(78.89, 0.36), many=(88.68, 0.26), medium=(86.61, 0.62),
                              few=(58.37, 1.18)),
}
# (a, b, why): paired comparisons of the chosen configurations; a name may be a run.
COMPARISONS = [
    ('sse_sam', 'sam', "the paper's headline: SSE-SAM against SAM"),
    ('sse_sam', 'imbsam', 'SSE-SAM against ImbSAM, batch-normalised (the paper rule)'),
    ('sse_sam_gn', 'imbsam_gn', 'SSE-SAM against ImbSAM, group-normalised'),
    ('sse_sam_gn', 'sam_gn', 'SSE-SAM against SAM on the group-normalised loss'),
    ('sam', 'sgd', 'SAM against its control'),
    ('imbsam', 'sgd', 'ImbSAM (batch) against its control'),
    ('sse_sam', 'sgd', 'SSE-SAM (batch) against its control'),
    ('sam_gn', 'sgd_gn', 'SAM (group-normalised loss) against its control'),
    ('imbsam_gn', 'sgd_gn', 'ImbSAM (group) against its control'),
    ('sse_sam_gn', 'sgd_gn', 'SSE-SAM (group) against its control'),
    ('sgd_gn', 'sgd', 'the reweighting alone'),
    ('drw', 'sgd', 'DRW alone'),
    ('sam_drw', 'drw', 'SAM + DRW against DRW'),
    ('imbsam_drw', 'drw', 'ImbSAM + DRW against DRW'),
    ('sse_sam_drw', 'drw', 'SSE-SAM + DRW against DRW'),
    ('sse_sam_drw', 'sam_drw', 'SSE-SAM + DRW against SAM + DRW'),
    ('ldam_drw', 'sgd', 'LDAM-DRW alone'),
    ('sam_ldam_drw', 'ldam_drw', 'SAM + LDAM-DRW against LDAM-DRW'),
    ('imbsam_ldam_drw', 'ldam_drw', 'ImbSAM + LDAM-DRW against LDAM-DRW'),
    ('sse_sam_ldam_drw', 'ldam_drw', 'SSE-SAM + LDAM-DRW against LDAM-DRW'),
    ('sse_sam_ldam_drw', 'sam_ldam_drw', 'SSE-SAM + LDAM-DRW against SAM + LDAM-DRW'),
]


def read_csv(setting: str, part: str = 'study') -> list[dict]:
  path = RESULTS / f'{part}_{setting}.csv'
  if not path.exists():
    return []
  with path.open() as f:
    out = []
    for r in csv.DictReader(f):
      for k in METRICS + ('balanced', 'train_seconds'):
        r[k] = float(r[k])
      for k in ('val_balanced', 'val_few'):
        r[k] = float(r[k]) if r[k] else float('nan')
      r['seed'] = int(r['seed'])
      out.append(r)
    return out


def by_run(rows) -> dict:
  out = {}
  for r in rows:
    out.setdefault(r['run'], {})[r['seed']] = r
  return out


def _ms(values) -> str:
  v = np.asarray(values, float)
  return f'{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}'


def chosen(runs: dict, method: str) -> str | None:
  """The grid point of ``method`` with the best mean validation score over the tuning
  seeds (the rule of ``study.chosen_scale``), as a run name."""
  scores = {}
  for scale in RADIUS_SCALES:
    per_seed = runs.get(config_name(method, scale), {})
    if not all(s in per_seed for s in TUNE_SEEDS):
      return None
    scores[config_name(method, scale)] = np.mean([per_seed[s]['val_balanced']
                                                  for s in TUNE_SEEDS])
  return max(scores, key=scores.get)


def resolve(runs: dict, name: str) -> str | None:
  """A method's chosen run where it was tuned (setting B), else ``name`` itself (a run
  at the reference radius)."""
  if name in METHODS and METHODS[name][2] and chosen(runs, name) is not None:
    return chosen(runs, name)
  return name if name in runs else None


def paired(runs, a: str, b: str, metric: str):
  """``(mean, low, high, n, better, mde, p)`` of ``a - b`` over shared seeds (``p``: the
  paired t-test's two-sided p-value), or ``None``."""
  seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
  if len(seeds) < 2:
    return None
  d = np.array([runs[a][s][metric] - runs[b][s][metric] for s in seeds])
  n, sd = len(d), d.std(ddof=1)
  t = scipy_stats.t.ppf(0.975, n - 1)
  half = t * sd / np.sqrt(n)
  mde = (t + scipy_stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
  p = float(2 * scipy_stats.t.sf(abs(d.mean()) / (sd / np.sqrt(n)), n - 1)) if sd > 0 else 0.0
  return d.mean(), d.mean() - half, d.mean() + half, n, int(np.sum(d > 0)), mde, p


CELLS = {'paired': 0, 'marginal': 0}  # the paired cells this report prints, and those marked


def _cell(p) -> str:
  if p is None:
    return 'n/a'
  mean, low, high, n, better, mde, pvalue = p
  sig = '**' if low > 0 or high < 0 else ''
  CELLS['paired'] += 1
  mark = ''
  if 0.01 < pvalue < 0.05:  # resolved at 5% but not at 1%: one of many comparisons
    CELLS['marginal'] += 1
    mark = f' (p {pvalue:.3f} †)'
  return f'{sig}{mean:+.2f} [{low:+.2f}, {high:+.2f}]{sig}{mark} {better}/{n}, MDE {mde:.2f}'


def comparison_table(runs, comparisons) -> list[str]:
  lines = ['| comparison (a − b) | runs | Few | All | Many | Medium |',
           '| --- | --- | --- | --- | --- | --- |']
  for a, b, why in comparisons:
    ra, rb = resolve(runs, a), resolve(runs, b)
    if ra is None or rb is None:
      continue
    cells = [_cell(paired(runs, ra, rb, m)) for m in ('few', 'all', 'many', 'medium')]
    lines.append(f'| {why} | `{ra}` − `{rb}` | ' + ' | '.join(cells) + ' |')
  return lines


def method_table(runs, names) -> list[str]:
  lines = ['| run | seeds | Many | Medium | Few | All | val balanced |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name in names:
    per_seed = runs.get(name)
    if not per_seed:
      continue
    rs = list(per_seed.values())
    val = [r['val_balanced'] for r in rs if not np.isnan(r['val_balanced'])]
    lines.append(f'| `{name}` | {len(rs)} | ' +
                 ' | '.join(_ms([r[m] for r in rs]) for m in METRICS) +
                 f" | {_ms(val) if val else 'n/a'} |")
  return lines


def tuning_table(runs) -> list[str]:
  lines = ['| method | radius | val balanced (seeds 0-2) | test Few (seeds 0-2) | '
           'test All (seeds 0-2) | |', '| --- | --- | --- | --- | --- | --- |']
  for method, (_, _, radii) in METHODS.items():
    if not radii:
      continue
    pick = chosen(runs, method)
    for scale in RADIUS_SCALES:
      name = config_name(method, scale)
      per_seed = runs.get(name, {})
      rs = [per_seed[s] for s in TUNE_SEEDS if s in per_seed]
      if not rs:
        continue
      radius = '/'.join(f'{v * scale:g}' for v in radii.values())
      lines.append(f"| {method} | {radius} | {_ms([r['val_balanced'] for r in rs])} | "
                   f"{_ms([r['few'] for r in rs])} | {_ms([r['all'] for r in rs])} | "
                   f"{'chosen' if name == pick else ''} |")
  return lines


def gamma_table(runs) -> list[str]:
  pick = chosen(runs, 'sse_sam')
  if pick is None:
    return []
  scale = float(pick.split('@x')[1]) if '@x' in pick else 1.0
  lines = ['| gamma | val balanced (seeds 0-2) | test Few (seeds 0-2) | test All (seeds 0-2) |',
           '| --- | --- | --- | --- |']
  found = False
  for gamma in (0.5, 0.7, 0.9):
    name = config_name('sse_sam', scale, None if gamma == 0.7 else gamma)
    rs = [runs.get(name, {}).get(s) for s in TUNE_SEEDS]
    if not all(rs):
      continue
    found = found or gamma in GAMMAS
    lines.append(f"| {gamma} | {_ms([r['val_balanced'] for r in rs])} | "
                 f"{_ms([r['few'] for r in rs])} | {_ms([r['all'] for r in rs])} |")
  if not found:
    return []
  best = max((g for g in (0.5, 0.7, 0.9) if all(
      runs.get(config_name('sse_sam', scale, None if g == 0.7 else g), {}).get(t)
      for t in TUNE_SEEDS)), key=lambda g: np.mean([
          runs[config_name('sse_sam', scale, None if g == 0.7 else g)][t]['val_balanced']
          for t in TUNE_SEEDS]))
  if best != 0.7:
    a, b = config_name('sse_sam', scale, best), config_name('sse_sam', scale)
    lines += ['', f'Validation chooses gamma {best}; against 0.7, all seeds: Few '
              f"{_cell(paired(runs, a, b, 'few'))}, All {_cell(paired(runs, a, b, 'all'))}."]
  return lines


def offset_table(setting, runs) -> list[str]:
  """Ours (study init, and Flax's init) against the anchor: Welch 95% intervals."""
  lines = ['| run | metric | anchor (n) | ours, PyTorch init (n) | ours − anchor [95%] | '
           "ours, Flax init (n) | Flax − anchor [95%] |",
           '| --- | --- | --- | --- | --- | --- | --- |']
  for (s, name), ref in ANCHOR.items():
    if s != setting or name not in runs:
      continue
    for metric in ('all', 'few'):
      cells = []
      for run in (name, f'{name}@flax_init'):
        v = np.array([r[metric] for r in runs.get(run, {}).values()])
        if len(v) < 2:
          cells += ['n/a', 'n/a']
          continue
        cells += [f'{_ms(v)} ({len(v)})', welch(v, (ref[metric], ref['n']))]
      lines.append(f'| `{name}` | {metric} | {ref[metric][0]:.2f} ± {ref[metric][1]:.2f} '
                   f"({ref['n']}) | " + ' | '.join(cells) + ' |')
  return lines


# the anchor row each run of the comparison parts reproduces
PART_ANCHOR = {'imbsam_gn': 'imbsam_gn', 'imbsam_gn@x0': 'sgd_gn', 'sse_sam_gn': 'sse_sam_gn',
               'sse_sam': 'sse_sam'}
PART_TITLES = {
    'bn_passes': ("BatchNorm running statistics: every pass (as the reference loop) against "
                  "the clean pass (the trainer's default)",
                  "Each base run trained twice per seed, once with each convention of "
                  "`model.running_stats` (`study.py run --parts bn_passes`); the training "
                  "itself is the same, only the statistics kept for evaluation differ. "
                  "ImbSAM with radius 0 is the anchor's reweighting control."),
    'bf16': ("Mixed precision: bfloat16 compute against float32",
             "Each base run trained twice per seed, in float32 and with "
             "`model.compute_dtype='bfloat16'` (`study.py run --parts bf16`)."),
}


def welch(values, ref) -> str:
  """``ours - anchor [95% Welch interval]`` against an anchor ``(mean, std), n``."""
  (m, sd), n = ref
  v = np.asarray(values, float)
  se2a, se2b = sd ** 2 / n, v.var(ddof=1) / len(v)
  dof = (se2a + se2b) ** 2 / (se2a ** 2 / (n - 1) + se2b ** 2 / (len(v) - 1))
  half = scipy_stats.t.ppf(0.975, dof) * np.sqrt(se2a + se2b)
  diff = v.mean() - m
  return f'{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}]'


def part_sections(setting: str = 'B') -> list[str]:
  """The comparison parts (``<part>_<setting>.csv``): both conventions per base run,
  their paired difference, and each against the anchor where it has the row."""
  out = []
  for part, (first, second) in PART_SUFFIXES.items():
    rows = read_csv(setting, part)
    if not rows:
      continue
    runs = by_run(rows)
    title, why = PART_TITLES[part]
    out += [f'## {title} (setting {setting})', '', why, '',
            '| run | seeds | Many | Medium | Few | All | ours − anchor: All / Few [95% Welch] |',
            '| --- | --- | --- | --- | --- | --- | --- |']
    bases = sorted({r['run'].removesuffix(first).removesuffix(second) for r in rows})
    for base in bases:
      for suffix in (first, second):
        per_seed = runs.get(base + suffix, {})
        if not per_seed:
          continue
        cells = [_ms([r[m] for r in per_seed.values()]) for m in METRICS]
        anchor = ANCHOR.get((setting, PART_ANCHOR.get(base, '')))
        vs = 'n/a'
        if anchor is not None and len(per_seed) > 1:
          vs = ' / '.join(welch([r[m] for r in per_seed.values()], (anchor[m], anchor['n']))
                          for m in ('all', 'few'))
        out.append(f'| `{base + suffix}` | {len(per_seed)} | ' + ' | '.join(cells)
                   + f' | {vs} |')
    out += ['', f'Paired by seed, `{second}` − `{first}`:', '',
            '| run | Few | All | Many | Medium |', '| --- | --- | --- | --- | --- |']
    for base in bases:
      out.append(f'| `{base}` | ' + ' | '.join(
          _cell(paired(runs, base + second, base + first, m))
          for m in ('few', 'all', 'many', 'medium')) + ' |')
    envs = sorted({r.get('environment', '') for r in rows} - {''})
    out += ['', 'Environment: ' + ('; '.join(envs) if envs else 'not recorded') + '.', '']
  return out


def convergence_check() -> list[str]:
  """From ``hessian_check_B.csv``: how far the extremes after k Lanczos steps are from
  those after the longest run, for seed 0's last checkpoint of every run."""
  path = RESULTS / 'hessian_check_B.csv'
  if not path.exists():
    return []
  with path.open() as f:
    checks = list(csv.DictReader(f))
  longest = max(int(c['lanczos_steps']) for c in checks)
  ref = {(c['run'], c['group']): c for c in checks if int(c['lanczos_steps']) == longest}
  lines = [f'Convergence check (`hessian_check_B.csv`): seed 0\'s epoch-40 checkpoint of every '
           f'run rerun with {longest} Lanczos steps; the relative distance of the extremes '
           f'after k steps to those after {longest}:', '',
           '| k | λ_min: max over runs and groups | λ_min: median | λ_max: max |',
           '| --- | --- | --- | --- |']
  for k in sorted({int(c['lanczos_steps']) for c in checks}):
    rel = {'lambda_min': [], 'lambda_max': []}
    for c in checks:
      if int(c['lanczos_steps']) == k:
        for key, values in rel.items():
          final = float(ref[(c['run'], c['group'])][key])
          values.append(abs(float(c[key]) - final) / abs(final))
    lines.append(f"| {k} | {100 * max(rel['lambda_min']):.2g}% | "
                 f"{100 * np.median(rel['lambda_min']):.2g}% | "
                 f"{100 * max(rel['lambda_max']):.2g}% |")
  return lines + ['']


def hessian_section() -> list[str]:
  """From ``hessian_B.csv`` (experiments/hessian_study.py): the last checkpoint's head and
  tail extremes per run, mean ± std over seeds, and the Lanczos convergence check."""
  path = RESULTS / 'hessian_B.csv'
  if not path.exists():
    return []
  with path.open() as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ('lambda_min', 'lambda_max', 'ratio', 'lambda_min_half', 'lambda_max_half'):
      r[k] = float(r[k])
  steps = sorted({int(r['step']) for r in rows})
  iters = max(int(r['lanczos_steps']) for r in rows)
  drift = max(abs(r['lambda_min'] - r['lambda_min_half']) / max(abs(r['lambda_min']), 1e-12)
              for r in rows)
  drift_max = max(abs(r['lambda_max'] - r['lambda_max_half']) / abs(r['lambda_max'])
                  for r in rows)
  lines = ['## Head and tail curvature (setting B, reference radii)', '',
           'Hessian of each group\'s **mean cross-entropy** (the same function for every '
           'method; 768 tail and 512 head training examples drawn once), '
           'BatchNorm in evaluation mode, extremes by Lanczos with full reorthogonalisation '
           f'({iters} steps). Convergence: over all {len(rows)} spectra, the Ritz values of '
           f'the first {iters // 2} steps differ from those of all {iters} by at most '
           f'{100 * drift:.2g}% (λ_min) and {100 * drift_max:.2g}% (λ_max), relative. '
           'Checkpoints at epochs ' + ', '.join(str(round(s / 97)) for s in steps) +
           '; the figures show the trajectories (mean ± std over seeds) and seed 0\'s '
           'spectral densities at epoch 40.', '',
           '![hessian trajectories](hessian_B.png)', '', '![densities](hessian_density_B.png)',
           '', 'The densities are smoothed with a Gaussian of width (λ_max − λ_min)/200, wider '
           'than the symmetric-log axis\'s linear range, so the bulk near 0 shows as a plateau; '
           'what they resolve is the reach and weight of the negative and positive outliers.',
           ''] + convergence_check() + [f'At epoch {round(steps[-1] / 97)}:', '',
           '| run | seeds | head λ_min | head λ_max | head λ_min/λ_max | tail λ_min | '
           'tail λ_max | tail λ_min/λ_max |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
  last = [r for r in rows if int(r['step']) == steps[-1]]
  for run in dict.fromkeys(r['run'] for r in last):
    cells = []
    for group in ('head', 'tail'):
      mine = [r for r in last if r['run'] == run and r['group'] == group]
      cells += [_ms([r['lambda_min'] for r in mine]), _ms([r['lambda_max'] for r in mine]),
                f"{100 * np.mean([r['ratio'] for r in mine]):+.2f}%"]
    n = len([r for r in last if r['run'] == run and r['group'] == 'head'])
    lines.append(f'| `{run}` | {n} | ' + ' | '.join(cells) + ' |')
  # paired by seed at the last checkpoint: {run: {seed: {'<group>_<key>': value}}}
  by_seed = {}
  for r in last:
    for key in ('lambda_min', 'lambda_max', 'ratio'):
      by_seed.setdefault(r['run'], {}).setdefault(int(r['seed']), {})[
          f"{r['group']}_{key}"] = r[key] * (100 if key == 'ratio' else 1)
  lines += ['', f'Paired by seed at epoch {round(steps[-1] / 97)} (a − b; a λ_min or ratio '
            'above 0 is the less negative one):', '',
            '| a − b | tail λ_min | tail λ_min/λ_max (%) | head λ_min | head λ_min/λ_max (%) |',
            '| --- | --- | --- | --- | --- |']
  for a, b in (('sse_sam', 'sgd'), ('sse_sam', 'sam'), ('sse_sam', 'imbsam'),
               ('imbsam', 'sgd'), ('sam', 'sgd'), ('sgd_gn', 'sgd'), ('sse_sam_gn', 'sgd_gn'),
               ('imbsam_gn', 'sgd_gn'), ('sam_gn', 'sgd_gn'), ('sse_sam_gn', 'imbsam_gn')):
    if a in by_seed and b in by_seed:
      cells = [_cell(paired(by_seed, a, b, k)) for k in
               ('tail_lambda_min', 'tail_ratio', 'head_lambda_min', 'head_ratio')]
      lines.append(f'| `{a}` − `{b}` | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def write_report() -> str:
  out = ['# Reproduction study v2: the offline long-tailed benchmark (MNIST-1D-LT)', '',
         'Generated by `python experiments/study_report.py` from `study_B.csv` and '
         '`study_A.csv` alone (one row per run and seed; `python experiments/study.py run` '
         'makes the runs, `... csv` the files). Test accuracy of the final model in %, '
         'mean ± std over training seeds; Many > 1000, Medium 200–1000, Few < 200 training '
         'examples. Common to every run: the reference code\'s PyTorch initialisation '
         '(`model.init=\'torch\'`) and a balanced validation split of 12,500 freshly generated '
         'examples (`data.val_generated`), on which radii and gamma are chosen.', '',
         'Paired cells: mean difference a − b [95% t-interval] (bold when it excludes 0), '
         'seeds on which a is better / seeds, and the minimum detectable effect of that many '
         'seeds (5% two-sided, 80% power, the observed spread).', '']
  total = 0.0
  for setting in ('B', 'A'):
    rows = read_csv(setting)
    if not rows:
      continue
    total += sum(r['train_seconds'] for r in rows)
    runs = by_run(rows)
    out += [f'## Setting {setting}', '']
    out += ['### Offset from the anchor (one change: the initialisation)', '']
    out += offset_table(setting, runs) + ['']
    out += ['Paired by seed, the initialisation alone (PyTorch − Flax, same seeds):', '',
            '| run | Few | All | Many | Medium |', '| --- | --- | --- | --- | --- |']
    for name in ('sgd', 'sse_sam'):
      if f'{name}@flax_init' in runs and name in runs:
        out.append(f'| `{name}` | ' + ' | '.join(
            _cell(paired(runs, name, f'{name}@flax_init', m))
            for m in ('few', 'all', 'many', 'medium')) + ' |')
    out += ['']
    if setting == 'B':
      out += ['### Radius chosen on validation (3 configurations per method)', '']
      out += tuning_table(runs) + ['']
      gamma = gamma_table(runs)
      if gamma:
        out += ['### SSE-SAM gamma at the chosen radii (chosen the same way)', ''] + gamma + ['']
    names = [resolve(runs, m) for m in METHODS] + sorted(
        n for n in runs if n not in METHODS and '@x' not in n and '@g' not in n)
    out += ['### Methods (chosen configurations; controls at reference radii)', '']
    out += method_table(runs, [n for n in dict.fromkeys(names) if n]) + ['']
    out += ['### Paired comparisons', ''] + comparison_table(runs, COMPARISONS) + ['']
    if setting == 'B':
      out += ['At the reference radii (untuned; seeds 0-2 unless extended):', '']
      out += comparison_table({k: v for k, v in runs.items() if '@x' not in k},
                              COMPARISONS[:4]) + ['']
  out += part_sections('B')
  out += hessian_section()
  hessian_csv = RESULTS / 'hessian_B.csv'
  if hessian_csv.exists():
    with hessian_csv.open() as f:
      hessian_s = sum(float(r.get('seconds') or 0) for r in csv.DictReader(f))
    out += [f'Hessian sweep: {hessian_s / 3600:.2f} hours (one process beside the two training '
            'workers; the 96-step check not included).', '']
  wall_path = RESULTS / 'study_wall.csv'
  if wall_path.exists():
    with wall_path.open() as f:
      wall = list(csv.DictReader(f))
    wall_s = sum(float(w['wall_s']) for w in wall)
    out += [f'Compute: {wall_s / 3600:.2f} hours of wall time on 2 CPU cores (two workers, '
            f'{len(wall)} invocations of `study.py run`, `study_wall.csv`); {total / 3600:.2f} '
            'hours of training summed over runs (two runs share the cores at a time).', '']
  else:
    out += [f'Compute: {total / 3600:.2f} hours of training summed over runs.', '']
  out += [f"Multiplicity: this report prints {CELLS['paired']} paired cells; "
          f"{CELLS['marginal']} of them have 0.01 < p < 0.05 (marked †). At that many "
          f"comparisons about {0.05 * CELLS['paired']:.0f} would fall below p 0.05 by chance "
          'alone, so a † result is a lead, not a finding.', '']
  notes = RESULTS / 'CONCLUSIONS.md'
  if notes.exists():
    out += [notes.read_text()]
  text = '\n'.join(out) + '\n'
  (RESULTS / 'REPORT.md').write_text(text)
  return text


if __name__ == '__main__':
  print(write_report())
