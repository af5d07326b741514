"""A workdir belongs to one experiment, and one process at a time.

:func:`claim` runs before anything else of a training run:

- it creates the workdir (a path that cannot be one is a :class:`UserError`);
- it takes an exclusive ``flock`` on ``workdir/.lock``: a second process on a
  live workdir is refused, and the kernel releases the lock when its holder
  dies, so a killed run never leaves it stuck;
- it compares the config with ``workdir/config.json`` (written at the first
  start, atomically): a change of any key that alters training is refused,
  naming the keys; keys that do not alter training (:data:`NEUTRAL_KEYS`:
  evaluation, logging, checkpoint cadence, Hessian probes, device layout,
  data location) may change. ``restart=True`` moves the old run aside (never
  deletes it) and starts fresh.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil

from etils import epath

logger = logging.getLogger(__name__)


class UserError(ValueError):
  """A mistake in what the user asked for (config, data, workdir): one line, no traceback."""


# Keys (or key prefixes ending in '.') that do not change what is trained.
NEUTRAL_KEYS = ('eval.', 'log_every_steps', 'checkpoint.', 'hessian.', 'num_devices',
                'parameter_sharding', 'fsdp_min_elements', 'data.num_workers',
                'data.prefetch_batches', 'data.data_dir', 'compilation_cache_dir',
                'background_compile_threads', 'data.augment_on')

# Keys whose default changed what is trained, with the value that a config saved
# before the key existed was trained with: such a config reads as that value, so a
# resume under the new default is refused instead of changing the run midway.
BEFORE_THE_KEY = {'data.pad_last_batch': False, 'cpu_convolutions': 'ynnpack'}

CONFIG_FILE = 'config.json'
# compilation_cache_dir='workdir': JAX's persistent cache and the serialized training
# programs (train/executable_cache.py) live here; a run set aside leaves it in place
CACHE_DIR = 'compilation_cache'


def as_path(workdir) -> epath.Path:
  """A workdir as an ``etils.epath.Path``: a local path, or any filesystem epath reaches
  (``gs://bucket/run`` on a TPU VM, with ``gcsfs`` or TensorFlow's gfile installed)."""
  return epath.Path(workdir)


def is_local(path) -> bool:
  return '://' not in os.fspath(path)


def flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def is_neutral(key: str) -> bool:
  """Whether the flattened config key ``key`` leaves what is trained unchanged."""
  return any(key == n or (n.endswith('.') and key.startswith(n)) for n in NEUTRAL_KEYS)


def config_changes(saved: dict, now: dict, defaults: dict | None = None) -> list[str]:
  """``'key: old -> new'`` for every key that alters training and differs. A key the
  saved config lacks (written by an older version) is no change while ``now`` holds
  its value in ``defaults``, unless the key is in :data:`BEFORE_THE_KEY` (then it reads
  as the value the older version trained with)."""
  saved, now = flatten(saved), flatten(now)
  saved = {**{k: v for k, v in BEFORE_THE_KEY.items() if saved and k not in saved}, **saved}
  defaults = flatten(defaults or {})
  changes = []
  for key in sorted(set(saved) | set(now)):
    if is_neutral(key) or saved.get(key) == now.get(key):
      continue
    if key not in saved and key in defaults and now.get(key) == defaults[key]:
      continue
    changes.append(f'{key}: {saved.get(key, "(absent)")!r} -> {now.get(key, "(absent)")!r}')
  return changes


class WorkdirLock:
  """An exclusive lock on ``workdir/.lock`` held while the run lives (local
  filesystems; an object store has no locks, so a remote workdir is not locked)."""

  def __init__(self, workdir: epath.Path):
    self.path = workdir / '.lock'
    if not is_local(workdir):
      self._file = None
      return
    self._file = open(os.fspath(self.path), 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'another process'
      self._file.close()
      raise UserError(f'{workdir} is in use by a running training ({holder}); wait for it, '
                      'or use another --workdir.') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()}')
    self._file.flush()

  def release(self):
    if self._file is not None and not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


def _make_dir(workdir: epath.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write_probe'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise UserError(f'cannot use {workdir} as a workdir: {e.strerror or e}.') from None


def _set_aside(workdir: epath.Path) -> epath.Path:
  """Moves the run in ``workdir`` to ``<workdir>.old-<time>``, all but its compilation
  cache (:data:`CACHE_DIR`), which stays for the next run there: its keys cover
  everything a program is built from, so a rerun of the same config loads its programs
  instead of compiling them, and another config's are compiled beside them."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  target = workdir.with_name(f'{workdir.name}.old-{stamp}')
  move(workdir, target)
  if (target / CACHE_DIR).exists():
    _make_dir(workdir)
    move(target / CACHE_DIR, workdir / CACHE_DIR)
  return target


def move(source: epath.Path, target: epath.Path) -> None:
  """Moves a file or folder (``shutil.move`` locally; epath's rename elsewhere)."""
  if is_local(source):
    shutil.move(os.fspath(source), os.fspath(target))
  else:
    source.rename(target)


def claim(workdir, config_dict: dict, *, restart: bool = False,
          defaults: dict | None = None, started=lambda: True) -> WorkdirLock:
  """Takes ``workdir`` for a run of ``config_dict``; returns the held lock (see module doc).
  ``defaults``: the current default config (see :func:`config_changes`). ``started()``:
  whether the run in ``workdir`` reached a checkpoint; one that did not (a data error, a
  NaN stop, a missing dataset before the first save) does not hold the workdir: another
  config starts fresh there, the failed start's files moved aside, with one line."""
  workdir = as_path(workdir)
  as_json = lambda d: json.loads(json.dumps(d))  # tuples as lists, as they are saved
  config_dict, defaults = as_json(config_dict), as_json(defaults or {})
  saved_path = workdir / CONFIG_FILE
  if restart and workdir.exists() and any(workdir.iterdir()):
    probe_lock = WorkdirLock(workdir)  # refuses while another run lives there
    probe_lock.release()
    moved = _set_aside(workdir)
    logger.info('--restart: the previous run of %s was moved to %s.', workdir, moved)
  _make_dir(workdir)
  lock = WorkdirLock(workdir)
  try:
    if saved_path.exists():
      try:
        saved = json.loads(saved_path.read_text())
      except json.JSONDecodeError:
        saved = None
      if saved is not None:
        changes = config_changes(saved, config_dict, defaults)
        if changes and not started():
          lock.release()
          moved = _set_aside(workdir)
          logger.info('%s held a run that never reached a checkpoint (%s); it was moved to %s '
                      'and this one starts fresh.', workdir, '; '.join(changes), moved)
          _make_dir(workdir)
          lock = WorkdirLock(workdir)
        elif changes:
          raise UserError(
              f'{workdir} holds another experiment; these keys differ from its '
              f'{CONFIG_FILE}: {"; ".join(changes)}. Use a new --workdir, or --restart to '
              'move the old run aside and start fresh.')
    tmp = saved_path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(config_dict, indent=1, sort_keys=True))
    tmp.replace(saved_path)
  except BaseException:
    lock.release()
    raise
  return lock
