"""Evaluation: top-1, per-class accuracy, Many/Medium/Few, confusion matrix, flip TTA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sse_sam_jax.data import ClassStats, Split


def make_predict(model, flip_tta: bool = False):
  """Jitted ``(params, batch_stats, x) -> predicted class ids`` in eval mode."""

  @jax.jit
  def predict(params, batch_stats, x):
    probs = jax.nn.softmax(model.apply(params, batch_stats, x, train=False)[0], axis=-1)
    if flip_tta:  # average over the input and its horizontal flip
      flipped = x[:, :, ::-1] if x.ndim == 4 else x[:, ::-1]
      probs = 0.5 * (probs + jax.nn.softmax(
          model.apply(params, batch_stats, flipped, train=False)[0], axis=-1))
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)

  return predict


def predict_split(predict, params, batch_stats, x, batch_size: int = 1000,
                  batch_sharding=None, transform=None) -> np.ndarray:
  """Predictions for the examples ``x`` (an array or a lazy image reader), in batches.

  Every batch has the shape of the first, the last one padded with its last row (its
  predictions dropped), so that a split compiles one program, not two (eval mode
  treats examples independently). With ``batch_sharding`` every batch is split over
  the mesh (padded to a multiple of its size); on several hosts each host reads only
  its rows of every batch and the predictions are gathered to every host.
  """
  n_shards = 1 if batch_sharding is None else batch_sharding.mesh.size
  n_hosts, host = jax.process_count(), jax.process_index()
  size = min(batch_size, len(x))
  size += -size % n_shards
  preds = []
  for start in range(0, len(x), batch_size):
    stop = min(start + batch_size, len(x))
    index = np.minimum(np.arange(start, start + size), stop - 1)  # padded: the last row
    if n_hosts > 1:  # this host's rows of the padded batch
      index = np.array_split(index, n_hosts)[host]
    rows = x[index[0]:index[-1] + 1]
    if len(rows) < len(index):  # padding beyond the end
      rows = np.concatenate([rows, np.repeat(rows[-1:], len(index) - len(rows), axis=0)])
    rows = rows if transform is None else transform(rows)
    if batch_sharding is None:
      batch = rows
    elif n_hosts > 1:
      batch = jax.make_array_from_process_local_data(batch_sharding, rows)
    else:
      batch = jax.device_put(rows, batch_sharding)
    out = predict(params, batch_stats, batch)
    if n_hosts > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    preds.append(np.asarray(out)[:stop - start])
  return np.concatenate(preds) if preds else np.zeros([0], np.int32)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (np.asarray(labels), np.asarray(predictions)), 1)
  return m


def metrics_from_confusion(confusion: np.ndarray, stats: ClassStats) -> dict:
  """All (plain accuracy), balanced (mean per-class) accuracy, per-class accuracy and the
  Many/Medium/Few means of it. Model selection on a long-tailed validation split should
  use ``balanced``: plain accuracy there is dominated by the head classes.

  A class without an example in the split has no accuracy: ``None`` in ``per_class``
  (JSON ``null``, never NaN), and it is left out of ``balanced`` and of its shot group's
  mean; a shot group none of whose classes occurs is ``None``.
  """
  support = confusion.sum(axis=1)
  present = support > 0
  per_class = np.diag(confusion) / np.maximum(support, 1)
  out = {'all': float(np.trace(confusion) / max(confusion.sum(), 1)),
         'balanced': float(per_class[present].mean()) if present.any() else None,
         'per_class': [float(a) if p else None for a, p in zip(per_class, present)]}
  for name, mask in stats.shot_groups().items():
    values = per_class[mask & present]
    out[name] = float(values.mean()) if values.size else None
  return out


def evaluate(predict, params, batch_stats, split: Split, stats: ClassStats,
             batch_size: int = 1000, transform=None, batch_sharding=None) -> dict:
  """Accuracy metrics of ``split`` (see :func:`metrics_from_confusion`) and its confusion."""
  preds = predict_split(predict, params, batch_stats, split.x, batch_size, batch_sharding,
                        transform)
  confusion = confusion_matrix(split.label, preds, split.num_classes)
  result = metrics_from_confusion(confusion, stats)
  result['confusion'] = confusion.tolist()
  return result


def format_table(rows: dict[str, dict]) -> str:
  """A Markdown Many/Medium/Few/All table, one row per name, in percent."""
  lines = ['| run | Many | Medium | Few | All |', '| --- | --- | --- | --- | --- |']
  cell = lambda v: '-' if v is None else f'{100 * v:.2f}'  # (a shot group not in the split)
  for name, m in rows.items():
    lines.append(f"| {name} | {cell(m['many'])} | {cell(m['medium'])} | {cell(m['few'])} | "
                 f"{cell(m['all'])} |")
  return '\n'.join(lines)
