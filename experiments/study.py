"""The reproduction study (v2) on the offline long-tailed benchmark: run, resume, tabulate.

  python experiments/study.py run --workers 2                 # every part, both cores
  python experiments/study.py run --parts offset tune         # some parts (each < 2 h)
  python experiments/study.py csv                             # per-seed rows -> study_<S>.csv
  python experiments/study.py reproduce B imbsam_gn@x0 0     # rerun a committed row, compare
  python experiments/study_report.py                          # STUDY.md from the CSVs alone

Every run is a training of ``sse_sam_jax.train.trainer`` with the offline benchmark's
config, the study's common overrides (:data:`COMMON`: the reference code's PyTorch
initialisation and a balanced validation split of 12,500 freshly generated examples)
and the run's own. A run writes ``runs/<setting>/<run>/seed<k>/results.json`` and is
skipped once that file exists; a worker claims a run with an exclusive ``.claim`` file
(its pid; a dead worker's claim is taken over), so any number of workers share the
queue and an interrupted sweep resumes where it stopped.

Parts (in queue order):
  offset    SGD with the study's init and with Flax's, 10 seeds, settings B and A, and
            SSE-SAM in A, 5 seeds: the offset from the anchor (shared/offline_benchmark.md),
            one change at a time.
  tune      every SAM-family method on 3 radii (the reference radius x 0.5, 1, 2) with
            seeds 0-2; the reweighting control with 10 seeds.
  final     each method's radius chosen by mean validation balanced accuracy over the
            tuning seeds (never the test set), extended to 8 seeds; SSE-SAM's gamma
            (0.5 / 0.9 beside 0.7) at the chosen radii, chosen the same way.
  controls  setting A's other anchor rows and batch-normalised ImbSAM (5 seeds); DRW and
            LDAM-DRW, alone and under SAM, ImbSAM and SSE-SAM (reference radii, 3 seeds);
            setting A's extras.
  bn_passes the group-normalised rows of the anchor (ImbSAM rho 0.1, its rho-0 control run
            as ImbSAM with radius 0 like the anchor's, group-normalised SSE-SAM), 6 seeds,
            with BatchNorm's running statistics from the clean pass (the trainer's
            default) and from every forward pass as the reference loop keeps them
            (run names ending '@every': model.running_stats='every_pass').
  bf16      SSE-SAM (as published) and group-normalised ImbSAM, 5 seeds, in float32 and
            with bfloat16 compute (run names ending '@bf16': model.compute_dtype).
The seed counts are constants below: raise them and rerun to extend a part.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'
RUNS_DIR = RESULTS / 'runs'
VARIANTS_DIR = RUNS_DIR / 'variants'  # issue 16's runs (variants_report.py)

SETTINGS = {'B': {'data.iid_noise_scale': 0.07}, 'A': {'data.iid_noise_scale': 0.02}}
COMMON = {'data.val_generated': 12500, 'model.init': 'torch'}
SEEDS = tuple(range(10))  # SGD and the reweighting control
FINAL_SEEDS = tuple(range(8))  # each method's chosen configuration
TUNE_SEEDS = (0, 1, 2)
CONTROL_SEEDS = tuple(range(5))  # the anchor's rows in setting A
DRW_SEEDS = (0, 1, 2)  # DRW / LDAM-DRW under each optimizer; setting A's extras
RADIUS_SCALES = (0.5, 1.0, 2.0)
GAMMAS = (0.5, 0.9)  # beside the paper's 0.7
BN_PASSES_SEEDS = tuple(range(6))
BN_PASSES_RUNS = ('imbsam_gn', 'imbsam_gn@x0', 'sse_sam_gn')
BF16_SEEDS = tuple(range(5))
BF16_RUNS = ('sse_sam', 'imbsam_gn')
# run-name suffixes of the parts that compare two settings of one key (their rows go to
# their own CSVs): what each adds to the description and the overrides
SUFFIXES = {
    '@clean': (', BatchNorm running statistics from the clean pass',
               {'model.running_stats': 'clean'}),
    '@every': (', BatchNorm running statistics from every pass',
               {'model.running_stats': 'every_pass'}),
    '@f32': (', float32', {'model.compute_dtype': 'float32'}),
    '@bf16': (', bfloat16 compute', {'model.compute_dtype': 'bfloat16'}),
}
PART_SUFFIXES = {'bn_passes': ('@clean', '@every'), 'bf16': ('@f32', '@bf16')}

_GN = {'loss.group_normalised': True}
_GROUP = {'optimizer.normalization': 'group'}
_DRW = {'loss.drw_epoch': 32}
_LDAM_DRW = {'loss.name': 'ldam', 'loss.drw_epoch': 32, 'model.normed_classifier': True}
_SSE_RADII = {'optimizer.head_rho': 0.05, 'optimizer.tail_rho': 0.1}

# method -> (description, overrides, reference radii: the grid scales them together)
METHODS = {
    'sgd': ('SGD', {'optimizer.name': 'sgd'}, None),
    'sgd_gn': ('SGD on the group-normalised loss (reweighting control; = ImbSAM rho 0)',
               {'optimizer.name': 'sgd', **_GN}, None),
    'sam': ('SAM', {'optimizer.name': 'sam'}, {'optimizer.rho': 0.05}),
    'sam_gn': ('SAM on the group-normalised loss', {'optimizer.name': 'sam', **_GN},
               {'optimizer.rho': 0.05}),
    'imbsam': ('ImbSAM, batch-normalised (paper rule)', {'optimizer.name': 'imbsam'},
               {'optimizer.tail_rho': 0.1}),
    'imbsam_gn': ('ImbSAM, group-normalised (SSE-SAM repo baseline)',
                  {'optimizer.name': 'imbsam', **_GROUP}, {'optimizer.tail_rho': 0.1}),
    'sse_sam': ('SSE-SAM, gamma 0.7, batch-normalised (as published)',
                {'optimizer.name': 'sse_sam'}, _SSE_RADII),
    'sse_sam_gn': ('SSE-SAM, gamma 0.7, group-normalised', {'optimizer.name': 'sse_sam', **_GROUP},
                   _SSE_RADII),
}
TUNED = tuple(m for m, (_, _, radii) in METHODS.items() if radii)
# Fixed-configuration runs: reference radii, no grid.
CONTROLS = {
    'drw': ('SGD + DRW (class-balanced weights from epoch 32)', {'optimizer.name': 'sgd', **_DRW}),
    'sam_drw': ('SAM 0.05 + DRW', {'optimizer.name': 'sam', **_DRW}),
    'imbsam_drw': ('ImbSAM 0.1 (batch-normalised) + DRW', {'optimizer.name': 'imbsam', **_DRW}),
    'sse_sam_drw': ('SSE-SAM 0.05/0.1 + DRW', {'optimizer.name': 'sse_sam', **_DRW}),
    'ldam_drw': ('SGD + LDAM-DRW', {'optimizer.name': 'sgd', **_LDAM_DRW}),
    'sam_ldam_drw': ('SAM 0.05 + LDAM-DRW', {'optimizer.name': 'sam', **_LDAM_DRW}),
    'imbsam_ldam_drw': ('ImbSAM 0.1 + LDAM-DRW', {'optimizer.name': 'imbsam', **_LDAM_DRW}),
    'sse_sam_ldam_drw': ('SSE-SAM 0.05/0.1 + LDAM-DRW', {'optimizer.name': 'sse_sam', **_LDAM_DRW}),
    'sgd@flax_init': ("SGD, Flax's default init (the study v1 setup)",
                      {'optimizer.name': 'sgd', 'model.init': 'flax'}),
    'sse_sam@flax_init': ("SSE-SAM 0.05/0.1, Flax's default init (the study v1 setup)",
                          {'optimizer.name': 'sse_sam', 'model.init': 'flax'}),
}


def config_name(method: str, scale: float = 1.0, gamma: float | None = None) -> str:
  """``sam`` (reference radius), ``sam@x0.5``, ``sse_sam@x2@g0.9``."""
  name = method if scale == 1.0 else f'{method}@x{scale:g}'
  return name if gamma is None else f'{name}@g{gamma:g}'


def parse_name(name: str) -> tuple[str, float, float | None]:
  for suffix in SUFFIXES:
    name = name.removesuffix(suffix)
  method, scale, gamma = name.split('@')[0], 1.0, None
  for part in name.split('@')[1:]:
    if part.startswith('x'):
      scale = float(part[1:])
    elif part.startswith('g'):
      gamma = float(part[1:])
  return method, scale, gamma


def overrides(run: str) -> tuple[str, dict]:
  """The description and config overrides of a run name."""
  for suffix, (more, extra_keys) in SUFFIXES.items():
    if run.endswith(suffix):
      desc, extra = overrides(run.removesuffix(suffix))
      return desc + more, {**extra, **extra_keys}
  if run in CONTROLS:
    return CONTROLS[run]
  method, scale, gamma = parse_name(run)
  if method not in METHODS:
    raise ValueError(f'unknown run {run!r}')
  desc, extra, radii = METHODS[method]
  extra = dict(extra)
  if radii:
    extra.update({k: v * scale for k, v in radii.items()})
    desc += ', radius ' + '/'.join(f'{v * scale:g}' for v in radii.values())
  if gamma is not None:
    extra['optimizer.gamma'] = gamma
    desc = desc.replace('gamma 0.7', f'gamma {gamma:g}')
  return desc, extra


def config_for(setting: str, run: str, seed: int, *, extra=None, common=None):
  """The run's config; ``extra``/``common`` replace the run's own overrides and
  :data:`COMMON` (the variants study of issue 16 ran without ``COMMON``)."""
  from sse_sam_jax.train.config import default_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.seed = seed
  c.eval.every_epochs = 40
  c.checkpoint.every_epochs = 10
  c.checkpoint.keep = 4  # epochs 10, 20, 30, 40: the Hessian analysis reads them
  c.compilation_cache_dir = str(RUNS_DIR / 'compilation_cache')  # shared: seeds reuse programs
  extra = overrides(run)[1] if extra is None else extra
  for key, value in {**SETTINGS[setting], **(COMMON if common is None else common),
                     **extra}.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# ----------------------------------------------------------------------------
# Results on disk
# ----------------------------------------------------------------------------
def result_path(setting: str, run: str, seed: int, root=RUNS_DIR) -> pathlib.Path:
  return root / setting / run / f'seed{seed}' / 'results.json'


def load(setting: str, root=None, runs=None) -> dict:
  """``{run: {seed: results.json}}`` of every finished run (of ``runs`` if given) under
  ``root`` (default :data:`RUNS_DIR`)."""
  out = {}
  base = (root or RUNS_DIR) / setting
  names = runs if runs is not None else sorted(p.name for p in base.glob('*') if p.is_dir())
  for name in names:
    for path in sorted((base / name).glob('seed*/results.json')):
      out.setdefault(name, {})[int(path.parent.name[4:])] = json.loads(path.read_text())
  return out


def val_score(result: dict) -> float:
  """Balanced (mean per-class) validation accuracy: the selection score."""
  return float(result['val']['balanced'])


def chosen_scale(setting: str, method: str) -> float | None:
  """The grid point with the best mean validation score over the tuning seeds;
  ``None`` until every tuning run of ``method`` has finished."""
  scores = {}
  for scale in RADIUS_SCALES:
    paths = [result_path(setting, config_name(method, scale), s) for s in TUNE_SEEDS]
    if not all(p.exists() for p in paths):
      return None
    scores[scale] = np.mean([val_score(json.loads(p.read_text())) for p in paths])
  return max(scores, key=scores.get)


def chosen_gamma(setting: str, scale: float) -> float | None:
  scores = {}
  for gamma in (0.7,) + GAMMAS:
    name = config_name('sse_sam', scale, None if gamma == 0.7 else gamma)
    paths = [result_path(setting, name, s) for s in TUNE_SEEDS]
    if not all(p.exists() for p in paths):
      return None
    scores[gamma] = np.mean([val_score(json.loads(p.read_text())) for p in paths])
  return max(scores, key=scores.get)


def jobs(parts) -> list[tuple[str, str, int]]:
  """The queue, in order: ``(setting, run, seed)``; parts of ``final`` appear once the
  tuning runs they depend on have finished."""
  out = []
  if 'offset' in parts:
    for setting in ('B', 'A'):
      for run in ('sgd', 'sgd@flax_init'):
        out += [(setting, run, s) for s in SEEDS]
    for run in ('sse_sam', 'sse_sam@flax_init'):  # the largest offset of study v1
      out += [('A', run, s) for s in CONTROL_SEEDS]
  if 'tune' in parts:
    for scale in (1.0, 0.5, 2.0):
      for method in TUNED:
        out += [('B', config_name(method, scale), s) for s in TUNE_SEEDS]
    out += [('B', 'sgd_gn', s) for s in SEEDS]
  if 'final' in parts:
    for method in TUNED:
      scale = chosen_scale('B', method)
      if scale is not None:
        out += [('B', config_name(method, scale), s) for s in FINAL_SEEDS]
        if method == 'sse_sam':
          out += [('B', config_name(method, scale, g), s) for g in GAMMAS for s in TUNE_SEEDS]
          gamma = chosen_gamma('B', scale)
          if gamma is not None and gamma != 0.7:
            out += [('B', config_name(method, scale, gamma), s) for s in FINAL_SEEDS]
  if 'controls' in parts:
    # the anchor's other rows in setting A first, then DRW / LDAM-DRW, then A's extras
    out += [('A', run, s) for run in ('sam', 'imbsam_gn', 'sgd_gn', 'imbsam')
            for s in CONTROL_SEEDS]
    out += [('B', run, s) for run in CONTROLS if '@' not in run for s in DRW_SEEDS]
    out += [('A', run, s) for run in ('sse_sam_gn', 'sam_gn') for s in DRW_SEEDS]
  if 'bn_passes' in parts:
    out += [('B', run + suffix, s) for s in BN_PASSES_SEEDS for run in BN_PASSES_RUNS
            for suffix in PART_SUFFIXES['bn_passes']]
  if 'bf16' in parts:
    out += [('B', run + suffix, s) for s in BF16_SEEDS for run in BF16_RUNS
            for suffix in PART_SUFFIXES['bf16']]
  return out


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except OSError as e:
    return e.errno == errno.EPERM
  return True


def claim(workdir: pathlib.Path) -> bool:
  """Takes the run for this process (an exclusive ``.claim`` file with its pid)."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / '.claim'
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(path.read_text() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and _pid_alive(pid):
        return False
      path.unlink(missing_ok=True)  # a dead worker's claim
      continue
    with os.fdopen(fd, 'w') as f:
      f.write(str(os.getpid()))
    return True
  return False


def work(parts) -> None:
  """One worker: takes unclaimed runs from the queue until none is left."""
  from sse_sam_jax.train import trainer  # pylint: disable=g-import-not-at-top
  while True:
    queue = [j for j in jobs(parts) if not result_path(*j).exists()]
    if not queue:
      return
    for setting, run, seed in queue:
      workdir = RUNS_DIR / setting / run / f'seed{seed}'
      if claim(workdir):
        break
    else:  # every pending run is someone else's; later ones may appear when they finish
      time.sleep(10)
      continue
    try:
      t0 = time.perf_counter()
      result = trainer.train(config_for(setting, run, seed), workdir, progress=False)
      if 'test' not in result:  # SIGTERM: checkpointed; the next worker resumes it
        print(f'{setting} {run} seed {seed}: stopped at step {result["stopped_at"]}', flush=True)
        return
      m = result['test']
      print(f"{setting} {run} seed {seed}: All {100 * m['all']:.2f} Few {100 * m['few']:.2f} "
            f"val {100 * val_score(result):.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    finally:
      (workdir / '.claim').unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# Per-seed table
# ----------------------------------------------------------------------------
CSV_FIELDS = ('setting', 'run', 'method', 'radius_scale', 'gamma', 'seed', 'many', 'medium',
              'few', 'all', 'balanced', 'val_balanced', 'val_few', 'train_seconds',
              'description', 'overrides', 'run_id', 'environment')


def environment(provenance: dict | None) -> str:
  """What a run's numbers depend on beyond its config, in one line ('' if not recorded:
  runs made before results.json had provenance)."""
  if not provenance:
    return ''
  v = provenance.get('versions', {})
  return (f"jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, optax "
          f"{v.get('optax')}, numpy {v.get('numpy')}, python {provenance.get('python')}, "
          f"{provenance.get('device_kind')} {provenance.get('cpu_model', '')}, "
          f"{provenance.get('device_count')} device(s), XLA_FLAGS "
          f"'{provenance.get('xla_flags', '')}'")


def rows(setting: str) -> list[dict]:
  out = []
  for run, per_seed in load(setting).items():
    if run == 'compilation_cache':
      continue
    method, scale, gamma = parse_name(run)
    desc, extra = overrides(run)
    for seed, r in sorted(per_seed.items()):
      test, val = r['test'], r.get('val') or {}
      out.append(dict(
          setting=setting, run=run, method=method, radius_scale=scale,
          gamma=gamma if gamma is not None else extra.get('optimizer.gamma', ''), seed=seed,
          many=100 * test['many'], medium=100 * test['medium'], few=100 * test['few'],
          all=100 * test['all'], balanced=100 * test['balanced'],
          val_balanced=100 * val['balanced'] if val else '',
          val_few=100 * val['few'] if val else '', train_seconds=r['train_seconds'],
          description=desc, overrides=json.dumps(extra, sort_keys=True),
          run_id=(r.get('provenance') or {}).get('run_id', ''),
          environment=environment(r.get('provenance'))))
  return out


def write_csv(path: pathlib.Path, table: list[dict], fields=None) -> None:
  """``table`` as a CSV with a header (``fields``: default the first row's keys)."""
  with path.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields or list(table[0]))
    writer.writeheader()
    writer.writerows(table)


def read_rows(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  with path.open() as f:
    return list(csv.DictReader(f))


def csv_path(setting: str, run: str) -> pathlib.Path:
  """The CSV a run's rows belong to: a comparison part's own, or the main study's."""
  for part, suffixes in PART_SUFFIXES.items():
    if run.endswith(suffixes):
      return RESULTS / f'{part}_{setting}.csv'
  return RESULTS / f'study_{setting}.csv'


def write_study_csvs() -> None:
  """Every finished run's row into its CSV. Rows of runs not on this machine are kept
  as committed; a run finished here replaces its row (run id and environment with it)."""
  for setting in SETTINGS:
    per_file = {}
    for row in rows(setting):
      per_file.setdefault(csv_path(setting, row['run']), []).append(row)
    for path, table in per_file.items():
      fresh = {(r['run'], str(r['seed'])) for r in table}
      kept = [r for r in read_rows(path) if (r['run'], r['seed']) not in fresh]
      merged = sorted(kept + table, key=lambda r: (r['run'], int(r['seed'])))
      write_csv(path, merged, CSV_FIELDS)
      print(f'wrote {path} ({len(table)} runs from here, {len(kept)} kept)')


METRIC_FIELDS = ('many', 'medium', 'few', 'all', 'balanced', 'val_balanced', 'val_few')


def reproduce(setting: str, run: str, seed: int, workdir: pathlib.Path) -> dict:
  """Reruns a committed row in ``workdir`` and compares it with the CSV: ``{'same':
  bool, 'differences': {field: (committed, now)}, 'committed_environment', 'environment'}``.
  Rows agree to the last digit only within one environment (CPU, library versions)."""
  from sse_sam_jax.train import trainer  # pylint: disable=g-import-not-at-top
  committed = [r for r in read_rows(csv_path(setting, run))
               if r['run'] == run and int(r['seed']) == seed]
  if not committed:
    raise ValueError(f'no committed row {setting} {run} seed {seed}')
  result = trainer.train(config_for(setting, run, seed), workdir, progress=False)
  test, val = result['test'], result.get('val') or {}
  now = dict(many=test['many'], medium=test['medium'], few=test['few'], all=test['all'],
             balanced=test['balanced'], val_balanced=val.get('balanced', ''),
             val_few=val.get('few', ''))
  differences = {}
  for field in METRIC_FIELDS:
    old, new = committed[0][field], now[field]
    new = '' if new == '' else 100 * new
    if (old == '') != (new == '') or (old != '' and float(old) != new):
      differences[field] = (old, new)
  return {'same': not differences, 'differences': differences,
          'committed_environment': committed[0].get('environment', ''),
          'environment': environment(result.get('provenance'))}


PARTS = ('offset', 'tune', 'final', 'controls', 'bn_passes', 'bf16')
WALL_CSV = RESULTS / 'study_wall.csv'


def finished() -> list[pathlib.Path]:
  return list(RUNS_DIR.glob('*/*/seed*/results.json'))


def log_wall(parts, workers: int, wall_s: float, runs: int) -> None:
  """Appends one invocation's wall time to ``study_wall.csv`` (the report sums it)."""
  new = not WALL_CSV.exists()
  with WALL_CSV.open('a', newline='') as f:
    writer = csv.writer(f)
    if new:
      writer.writerow(['finished_at', 'parts', 'workers', 'wall_s', 'runs_finished'])
    writer.writerow([time.strftime('%Y-%m-%dT%H:%M:%S'), ' '.join(parts), workers,
                     round(wall_s, 1), runs])


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('command', choices=('run', 'work', 'csv', 'queue', 'reproduce'))
  parser.add_argument('row', nargs='*', help='reproduce: SETTING RUN SEED')
  parser.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
  parser.add_argument('--workers', type=int, default=2)
  args = parser.parse_args(argv)
  if args.command == 'csv':
    write_study_csvs()
  elif args.command == 'reproduce':
    import tempfile  # pylint: disable=g-import-not-at-top
    setting, run, seed = args.row
    with tempfile.TemporaryDirectory() as tmp:
      out = reproduce(setting, run, int(seed), pathlib.Path(tmp) / 'run')
    print(json.dumps(out, indent=1))
    sys.exit(0 if out['same'] else 1)
  elif args.command == 'queue':
    for j in jobs(args.parts):
      print(*j, 'done' if result_path(*j).exists() else '')
  elif args.command == 'work':
    work(args.parts)
  else:
    t0, done = time.perf_counter(), len(finished())
    cmd = [sys.executable, __file__, 'work', '--parts', *args.parts]
    procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
    try:
      codes = [p.wait() for p in procs]
    finally:  # interrupted too: the wall time spent so far counts
      wall = time.perf_counter() - t0
      log_wall(args.parts, args.workers, wall, len(finished()) - done)
    print(f'study: {wall:.0f}s wall with {args.workers} workers; exit codes {codes}')
    write_study_csvs()
    sys.exit(max(codes))


if __name__ == '__main__':
  main()
