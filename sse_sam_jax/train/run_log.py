"""What a run writes as it goes: metric lines (JSON + TensorBoard) and the per-class plot."""

from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np

from sse_sam_jax.train import workdir as workdir_lib

logger = logging.getLogger(__name__)


class MetricLog:
  """JSON lines + TensorBoard, written by the first host only (every host computes the
  same metrics). On a local disk lines are appended; on an object store (``gs://``),
  which cannot append, the file is rewritten whole with each line."""

  def __init__(self, workdir):
    workdir = workdir_lib.as_path(workdir)
    self.path = workdir / 'metrics.jsonl'
    self.local = workdir_lib.is_local(workdir)
    self.primary = jax.process_index() == 0
    self.tb = None
    if self.primary:
      from tensorboardX import SummaryWriter
      try:
        self.tb = SummaryWriter(str(workdir / 'tensorboard'))
      except Exception as e:  # pylint: disable=broad-except
        logger.warning('TensorBoard logs off: tensorboardX cannot write to %s: %s', workdir, e)

  def write(self, step: int, **scalars):
    if not self.primary:
      return
    line = json.dumps({'step': step, **scalars}) + '\n'
    if self.local:
      with self.path.open('a') as f:
        f.write(line)
    else:
      before = self.path.read_text() if self.path.exists() else ''
      self.path.write_text(before + line)
    if self.tb is None:
      return
    for k, v in scalars.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def discard_after(self, step: int):
    """Drops the lines of steps after ``step`` (a resumed run redoes them)."""
    if not self.primary or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [l for l in lines if json.loads(l)['step'] <= step]
    if len(kept) < len(lines):
      tmp = self.path.with_suffix('.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self.path)

  def close(self):
    if self.tb is not None:
      self.tb.close()


def plot_per_class(per_class, counts, path, title=''):
  # A Figure of its own, not pyplot's: no backend is switched and no global figure is left
  # behind in the caller's process (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5, 3.5))
  ax = fig.add_subplot()
  ax.scatter(counts, 100 * np.asarray(per_class, float))
  ax.set_xscale('log')
  ax.set_xlabel('training examples of the class')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with workdir_lib.as_path(path).open('wb') as f:  # any filesystem epath reaches
    fig.savefig(f, format='png', dpi=120)
