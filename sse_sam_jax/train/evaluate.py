"""Evaluation: top-1, per-class accuracy, Many/Medium/Few, confusion matrix, flip TTA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sse_sam_jax.data import ClassStats, Split


def make_predict(model, flip_tta: bool = False):
  """Jitted ``(params, batch_stats, x) -> class probabilities`` in eval mode."""

  @jax.jit
  def predict(params, batch_stats, x):
    probs = jax.nn.softmax(model.apply(params, batch_stats, x, train=False)[0], axis=-1)
    if flip_tta:  # average over the input and its horizontal flip
      flipped = x[:, :, ::-1] if x.ndim == 4 else x[:, ::-1]
      probs = 0.5 * (probs + jax.nn.softmax(
          model.apply(params, batch_stats, flipped, train=False)[0], axis=-1))
    return probs

  return predict


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (np.asarray(labels), np.asarray(predictions)), 1)
  return m


def metrics_from_confusion(confusion: np.ndarray, stats: ClassStats) -> dict:
  """All (plain accuracy), balanced (mean per-class) accuracy, per-class accuracy and the
  Many/Medium/Few means of it. Model selection on a long-tailed validation split should
  use ``balanced``: plain accuracy there is dominated by the head classes."""
  support = confusion.sum(axis=1)
  per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
  out = {'all': float(np.trace(confusion) / max(confusion.sum(), 1)),
         'balanced': float(np.nanmean(per_class)),  # = 'all' on a balanced test set
         'per_class': per_class.tolist()}
  for name, mask in stats.shot_groups().items():
    values = per_class[mask & (support > 0)]
    out[name] = float(values.mean()) if values.size else float('nan')
  return out


def evaluate(predict, params, batch_stats, split: Split, stats: ClassStats,
             batch_size: int = 1000, transform=None) -> dict:
  preds = []
  for start in range(0, len(split), batch_size):
    x = split.x[start:start + batch_size]
    x = x if transform is None else transform(x)
    preds.append(np.asarray(jnp.argmax(predict(params, batch_stats, x), axis=-1)))
  confusion = confusion_matrix(split.label, np.concatenate(preds), split.num_classes)
  result = metrics_from_confusion(confusion, stats)
  result['confusion'] = confusion.tolist()
  return result


def format_table(rows: dict[str, dict]) -> str:
  """A Markdown Many/Medium/Few/All table, one row per name, in percent."""
  lines = ['| run | Many | Medium | Few | All |', '| --- | --- | --- | --- | --- |']
  for name, m in rows.items():
    lines.append(f"| {name} | {100 * m['many']:.2f} | {100 * m['medium']:.2f} | "
                 f"{100 * m['few']:.2f} | {100 * m['all']:.2f} |")
  return '\n'.join(lines)
