"""Resume compile: a resumed run's compile time over the first run's, each in a fresh process.

For each run, in a fresh workdir (whose ``compilation_cache/`` is the default
persistent cache):

  1. ``first``: a new Python process trains from scratch and stops after
     ``--stop-after`` steps (checkpointing there);
  2. the workdir is copied twice;
  3. ``resume``: a new process resumes the first copy: its train programs come
     from the serialized executables (``compilation_cache/executables``);
  4. ``resume_xla_cache_only``: a new process resumes the second copy with the
     executables deleted: JAX's persistent cache alone (tracing and lowering
     still run; the only means before the executable cache).

Compile time is the trainer's ``compile_s`` (every train program the run
needs, built before step 0), read from ``results.json``. Each process also
reports its wall time.

  python benchmarks/resume_compile.py [--runs main,resnet] [--stop-after 200]
      [--out benchmarks/results/resume_compile.json]

The last printed line is ``resume compile ratio: <max over runs>``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loop_efficiency  # pylint: disable=g-import-not-at-top,wrong-import-position

_CHILD = """
import json, pickle, sys
from sse_sam_jax.train import trainer
c = pickle.loads(bytes.fromhex(sys.argv[1]))
result = trainer.train(c, sys.argv[2], progress=False, stop_after_steps=int(sys.argv[3]) or None)
timing = result['timing'] if 'timing' in result else {'compile_s': result['compile_s']}
print('RESULT ' + json.dumps({'stopped_at': result.get('stopped_at'), 'timing': timing}))
"""


def _train_in_new_process(c, workdir: pathlib.Path, stop_after: int) -> dict:
  import pickle  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', _CHILD, pickle.dumps(c).hex(), str(workdir),
                        str(stop_after)], check=True, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  (line,) = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  result = json.loads(line[len('RESULT '):])
  result['wall_s'] = round(wall, 2)
  return result


def measure(name, c, stop_after: int, root: pathlib.Path) -> dict:
  first_dir = root / name / 'first'
  first = _train_in_new_process(c, first_dir, stop_after)
  resume_dir, xla_only_dir = root / name / 'resume', root / name / 'xla_only'
  shutil.copytree(first_dir, resume_dir)
  shutil.copytree(first_dir, xla_only_dir)
  shutil.rmtree(xla_only_dir / 'compilation_cache' / 'executables')
  resume = _train_in_new_process(c, resume_dir, 0)
  xla_only = _train_in_new_process(c, xla_only_dir, 0)
  first_compile = first['timing']['compile_s']
  row = {'first': first, 'resume': resume, 'resume_xla_cache_only': xla_only,
         'ratio': resume['timing']['compile_s'] / first_compile,
         'ratio_xla_cache_only': xla_only['timing']['compile_s'] / first_compile}
  print(f"{name}: compile first {first_compile:.2f}s, resumed "
        f"{resume['timing']['compile_s']:.2f}s ({row['ratio']:.1%}; "
        f"{resume['timing']['programs_loaded']} programs loaded), XLA cache only "
        f"{xla_only['timing']['compile_s']:.2f}s ({row['ratio_xla_cache_only']:.1%}); "
        f"process wall {first['wall_s']:.1f}s / {resume['wall_s']:.1f}s / "
        f"{xla_only['wall_s']:.1f}s", flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default='main,resnet')
  parser.add_argument('--stop-after', type=int, default=200)
  loop_efficiency.add_resnet_arguments(parser, epochs=2)
  parser.add_argument('--out', default='benchmarks/results/resume_compile.json')
  args = parser.parse_args()
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    for name in args.runs.split(','):
      c = loop_efficiency.run_config(name, args, root)
      stop = (args.stop_after if name == 'main'
              else max(1, args.resnet_examples // args.resnet_batch // 2))  # mid first epoch
      rows[name] = measure(name, c, stop, root)
  out = {'device': jax.devices()[0].device_kind, 'platform': platform.platform(),
         'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'runs': rows}
  pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + '\n')
  print(f"resume compile ratio: {max(r['ratio'] for r in rows.values()):.3f}")


if __name__ == '__main__':
  main()
