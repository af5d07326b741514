"""Where a run's results come from: the package and its source (git commit, dirty or not,
when run from a checkout), the library versions, Python, the machine and device, the XLA
flags and the config, with a short ``run_id`` that names this combination."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys

import jax

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy',
            'ml-collections')


def _git(root: pathlib.Path) -> dict | None:
  """``{'commit', 'dirty'}`` of the checkout the package runs from, else ``None``."""
  if not (root / '.git').exists():
    return None
  try:
    commit = subprocess.run(['git', '-C', str(root), 'rev-parse', 'HEAD'], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(['git', '-C', str(root), 'status', '--porcelain',
                             '--untracked-files=no'], capture_output=True, text=True,
                            timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {'commit': commit, 'dirty': bool(status.strip())}


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def provenance(config: dict) -> dict:
  """The provenance of a run of ``config`` (a plain dict) on this process's devices;
  ``run_id`` digests it with the config (results.json keeps the config beside it)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  import sse_sam_jax  # pylint: disable=g-import-not-at-top
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  out = {'sse_sam_jax': sse_sam_jax.__version__,
         'git': _git(pathlib.Path(sse_sam_jax.__file__).resolve().parents[1]),
         'versions': versions, 'python': sys.version.split()[0],
         'platform': platform.platform(), 'cpu_model': cpu_model(),
         'device_kind': device.device_kind, 'backend': device.platform,
         'device_count': jax.device_count(), 'process_count': jax.process_count(),
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'x64': bool(jax.config.jax_enable_x64)}
  digest = json.dumps({'provenance': out, 'config': config}, sort_keys=True, default=repr)
  out['run_id'] = hashlib.sha256(digest.encode()).hexdigest()[:12]
  return out
