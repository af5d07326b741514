"""The training system's messages, through :mod:`logging` (logger ``sse_sam_jax``).

Information goes to standard output and warnings and errors to standard error, as
plain lines; in a multi-host run only the first host's messages are shown unless
``all_hosts``. The CLI sets this up from ``--verbosity`` and ``--log-all-hosts``; a
program that calls :func:`sse_sam_jax.train.train` gets the same defaults unless it
configured the ``sse_sam_jax`` logger itself.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = 'sse_sam_jax'
LEVELS = ('debug', 'info', 'warning', 'error')


class _StdStream(logging.StreamHandler):
  """Writes to ``sys.stdout`` or ``sys.stderr`` as they are when a record is emitted
  (so a redirected or captured stream is followed)."""

  def __init__(self, name: str):
    super().__init__()
    self._name = name

  @property
  def stream(self):  # type: ignore[override]
    return getattr(sys, self._name)

  @stream.setter
  def stream(self, value):  # StreamHandler.__init__ assigns it
    del value


class _FirstHost(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index() == 0


def setup(verbosity: str = 'info', all_hosts: bool = False) -> logging.Logger:
  """(Re)configures the ``sse_sam_jax`` logger: ``verbosity`` one of :data:`LEVELS`."""
  if verbosity not in LEVELS:
    raise ValueError(f'verbosity must be one of {LEVELS}, got {verbosity!r}.')
  logger = logging.getLogger(LOGGER_NAME)
  for handler in list(logger.handlers):
    if isinstance(handler, _StdStream):
      logger.removeHandler(handler)
  out, err = _StdStream('stdout'), _StdStream('stderr')
  out.addFilter(lambda record: record.levelno < logging.WARNING)
  err.setLevel(logging.WARNING)
  for handler in (out, err):
    handler.setFormatter(logging.Formatter('%(message)s'))
    if not all_hosts:
      handler.addFilter(_FirstHost())
    logger.addHandler(handler)
  logger.setLevel(verbosity.upper())
  logger.propagate = False
  return logger


def ensure_setup() -> None:
  """:func:`setup` with its defaults, unless the logger already has handlers."""
  if not logging.getLogger(LOGGER_NAME).handlers:
    setup()
