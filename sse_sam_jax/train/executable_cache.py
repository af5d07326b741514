"""Compiled training programs kept on disk, so a rerun or a resume neither traces nor compiles.

JAX's persistent compilation cache (``compilation_cache_dir``) skips XLA's compile,
but a rerun still traces the step and lowers it to StableHLO to find the cache
key: for a 2-epoch main job that was 1.7 s of its 7.6 s compile on 2 CPU cores.
This cache stores the compiled executables themselves
(:mod:`jax.experimental.serialize_executable`) under a key computed without
tracing, so a resumed run loads them in a fraction of a second.

The key must change whenever the program could: it covers the run's config, the
data's class counts and size, the source of this package, the versions of jax,
jaxlib, flax, optax and numpy, ``XLA_FLAGS``, the x64 and matmul-precision
settings, the backend (platform, its version, the devices and their kinds, this
process's index; on CPU the host's instruction-set flags, since XLA:CPU compiles
for the host), and each program's own signature (stage, kind of step, steps per
dispatch, and the shapes, dtypes and shardings of the state and the batch). A
program built from code outside this package and the config (e.g. a model passed
in by hand) is not covered: the trainer builds everything from the config.

A file that cannot be read back (damaged, written by another jaxlib) is deleted
and the program compiled again; writes are atomic (a temporary file, then a
rename). Off with the persistent cache (``compilation_cache_dir=''``).

Only executables XLA compiled in this process are stored (:func:`compile_lowered`): on
XLA:CPU (jaxlib 0.12) an executable that was itself deserialized, e.g. a hit of
JAX's persistent cache, serializes to a payload whose loaded copy fails at run
time ("Function ... not found").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import pickle
import platform
import sys
import threading
import uuid

import jax

logger = logging.getLogger(__name__)

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')
_PERSISTENT_CACHE_HIT = '/jax/compilation_cache/cache_hits'
_hits = threading.local()


def _count_hit(event: str, **kwargs) -> None:
  del kwargs
  if event == _PERSISTENT_CACHE_HIT:
    _hits.count = getattr(_hits, 'count', 0) + 1


@functools.cache
def _listen_for_hits() -> None:
  jax.monitoring.register_event_listener(_count_hit)


def compile_lowered(lowered, compiler_options=None):
  """``lowered.compile(compiler_options)``, and whether XLA compiled it here (False
  where JAX's persistent cache supplied it: such an executable must not be stored)."""
  _listen_for_hits()
  before = getattr(_hits, 'count', 0)
  compiled = lowered.compile(compiler_options=compiler_options or None)
  return compiled, getattr(_hits, 'count', 0) == before


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """SHA-256 over every ``.py`` file of this package (path and content)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  h = hashlib.sha256()
  for path in sorted(root.rglob('*.py')):
    h.update(str(path.relative_to(root)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _versions() -> dict:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {'python': sys.version}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def environment() -> dict:
  """Everything outside the run's config that a compiled program depends on."""
  devices = jax.devices()
  env = {'versions': _versions(), 'source': source_digest(),
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'x64': bool(jax.config.jax_enable_x64),
         'matmul_precision': str(jax.config.jax_default_matmul_precision),
         'platform': devices[0].platform,
         'platform_version': devices[0].client.platform_version,
         'devices': [(d.id, d.device_kind, d.process_index) for d in devices],
         'process': (jax.process_index(), jax.process_count())}
  if env['platform'] == 'cpu':
    env['cpu_flags'] = _cpu_flags()
  return env


def _spec(tree) -> list:
  leaves, treedef = jax.tree.flatten(tree)
  return [str(treedef)] + [(tuple(x.shape), str(x.dtype), repr(getattr(x, 'sharding', None)))
                           for x in leaves]


class ExecutableCache:
  """A folder of serialized executables for one run.

  ``fingerprint``: anything JSON-serialisable (``default=repr``) that names the
  program family, e.g. the config and the data's class counts; the
  :func:`environment` is added to it.
  """

  def __init__(self, directory, fingerprint):
    self.directory = pathlib.Path(os.fspath(directory))
    base = json.dumps({'run': fingerprint, 'env': environment()}, sort_keys=True,
                      default=repr)
    self._base = hashlib.sha256(base.encode()).hexdigest()
    self.loaded = 0

  def _path(self, program, state, batch) -> pathlib.Path:
    key = json.dumps([self._base, repr(program), _spec(state), _spec(batch)], default=repr)
    return self.directory / (hashlib.sha256(key.encode()).hexdigest() + '.executable')

  def has(self, program, state, batch) -> bool:
    """Whether a stored executable of ``program`` exists (it may still fail to load)."""
    return self._path(program, state, batch).exists()

  def load(self, program, state, batch):
    """The stored executable of ``program`` for these state and batch specs, or None."""
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    path = self._path(program, state, batch)
    if not path.exists():
      return None
    try:
      payload, in_tree, out_tree = pickle.loads(path.read_bytes())
      compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception as e:  # pylint: disable=broad-except
      logger.warning('executable cache: %s could not be loaded (%s: %s); compiling it again.',
                     path.name, type(e).__name__, e)
      path.unlink(missing_ok=True)
      return None
    self.loaded += 1
    return compiled

  def store(self, program, state, batch, compiled) -> bool:
    """Writes ``compiled`` atomically; False where this backend cannot serialize it."""
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    try:
      payload = pickle.dumps(serialize_executable.serialize(compiled))
    except Exception:  # pylint: disable=broad-except  (e.g. not supported by a plugin)
      return False
    path = self._path(program, state, batch)
    self.directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return True
