"""What a run writes as it goes: metric lines (JSON + TensorBoard) and the per-class plot."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np


class MetricLog:
  """JSON lines + TensorBoard, written by the first host only (every host computes the
  same metrics)."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / 'metrics.jsonl'
    self.primary = jax.process_index() == 0
    if self.primary:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, **scalars):
    if not self.primary:
      return
    with self.path.open('a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
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
    if self.primary:
      self.tb.close()


def plot_per_class(per_class, counts, path, title=''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.scatter(counts, 100 * np.asarray(per_class, float))
  ax.set_xscale('log')
  ax.set_xlabel('training examples of the class')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
