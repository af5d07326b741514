"""Mutation score of the optimizer core, the losses, the class statistics and the evaluation,
with mutmut (configured in pyproject's ``[tool.mutmut]``: what is mutated, which fast
tests guard it). Not part of CI's timed suite: all 2,502 mutants take hours on 2 cores, so
``run`` takes a seeded sample per module unless ``--all``.

  pip install 'mutmut>=3.8'
  python tests/mutation_score.py run --per-module 20      # seeded stratified sample
  python tests/mutation_score.py run --all                # every mutant (hours)
  python tests/mutation_score.py report                   # per-module score of what ran
  mutmut show <mutant>                                    # one survivor's diff

The hand-written ``tests/mutation_audit.py`` stays as a regression set of the mistakes
it lists; new findings become tests, not entries there.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MUTANTS = ROOT / 'mutants'


def all_mutants() -> dict[str, list[tuple[str, int | None]]]:
  """``{module: [(mutant, exit code or None if not run), ...]}`` from mutmut's files."""
  out = {}
  for meta in sorted(MUTANTS.glob('sse_sam_jax/**/*.py.meta')):
    module = str(meta.relative_to(MUTANTS))[:-len('.py.meta')].replace('/', '.')
    codes = json.loads(meta.read_text()).get('exit_code_by_key', {})
    out[module] = sorted(codes.items())
  return out


def generate() -> None:
  """Makes ``mutants/`` (mutmut mutates on its first run; this runs none of them)."""
  if not MUTANTS.exists():
    subprocess.run(['mutmut', 'run', 'no_such_mutant'], cwd=ROOT, check=False)


def sample(per_module: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  names = []
  for _, mutants in sorted(all_mutants().items()):
    keys = [k for k, _ in mutants]
    names += keys if len(keys) <= per_module else rng.sample(keys, per_module)
  return names


def run(args) -> None:
  generate()
  names = [] if args.all else sample(args.per_module, args.seed)
  subprocess.run(['mutmut', 'run', '--max-children', str(args.jobs), *names], cwd=ROOT,
                 check=False)


def status(code) -> str:
  """mutmut's own reading of a mutant's exit code ('killed', 'survived', 'no tests',
  'timeout', ...; 'not run' before it ran)."""
  from mutmut.stats import status_by_exit_code  # pylint: disable=g-import-not-at-top
  return 'not run' if code is None else status_by_exit_code[code]


def report(_args) -> dict:
  table = {}
  for module, mutants in all_mutants().items():
    counts = collections.Counter(status(code) for _, code in mutants)
    ran = sum(v for k, v in counts.items() if k != 'not run')
    tested = counts['killed'] + counts['survived']
    table[module] = dict(counts, mutants=len(mutants), ran=ran,
                         score=round(counts['killed'] / tested, 3) if tested else None)
    print(f"{module:40s} {len(mutants):5d} mutants, {ran:4d} ran: {counts['killed']:4d} killed, "
          f"{counts['survived']:3d} survived, {counts['no tests']:3d} without a test"
          + (f", score {table[module]['score']:.2f}" if tested else ''))
  killed = sum(t.get('killed', 0) for t in table.values())
  survived = sum(t.get('survived', 0) for t in table.values())
  if killed + survived:
    print(f'overall: {killed} killed, {survived} survived: {killed / (killed + survived):.3f}')
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('command', choices=('run', 'report'))
  parser.add_argument('--per-module', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--all', action='store_true')
  parser.add_argument('--jobs', type=int, default=2)
  args = parser.parse_args(argv)
  {'run': run, 'report': report}[args.command](args)


if __name__ == '__main__':
  sys.exit(main())
