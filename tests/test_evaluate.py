"""Evaluation (sse_sam_jax/train/evaluate.py): batched predictions, the confusion matrix,
all / balanced / per-class and Many/Medium/Few accuracy, the table; fast unit tests that
the mutation run (pyproject's [tool.mutmut]) uses as the module's guard."""

import json

import numpy as np
import pytest

from sse_sam_jax import models
from sse_sam_jax.data import ClassStats
from sse_sam_jax.train import evaluate


def test_an_evaluation_split_compiles_one_program_and_keeps_every_prediction():
  """37 examples in batches of 10: the last batch of 7 runs padded in the program of
  the others, and every example gets the prediction it gets on its own."""
  model, params, stats = models.create('mlp', 5, in_features=6)
  x = np.random.default_rng(0).normal(size=(37, 6)).astype(np.float32)
  predict = evaluate.make_predict(model)
  preds = evaluate.predict_split(predict, params, stats, x, batch_size=10)
  assert predict._cache_size() == 1  # pylint: disable=protected-access
  single = evaluate.make_predict(model)
  one_by_one = [int(single(params, stats, x[i:i + 1])[0]) for i in range(len(x))]
  np.testing.assert_array_equal(preds, one_by_one)
  assert len(set(one_by_one)) > 1  # a model that predicts one class would prove nothing
  small = evaluate.predict_split(predict, params, stats, x[:4], batch_size=10)
  np.testing.assert_array_equal(small, one_by_one[:4])  # a split smaller than a batch


def test_many_medium_few_on_a_crafted_confusion():
  stats = ClassStats(np.array([5000, 1500, 500, 300, 100, 50]), many_above=1000, few_below=200)
  labels = np.repeat(np.arange(6), 10)
  preds = labels.copy()
  preds[0:1] = 1      # class 0: 9/10
  preds[10:14] = 0    # class 1: 6/10
  preds[20:25] = 3    # class 2: 5/10
  preds[30:40] = 2    # class 3: 0/10
  preds[40:42] = 0    # class 4: 8/10
  # class 5: 10/10
  conf = evaluate.confusion_matrix(labels, preds, 6)
  assert conf[1, 0] == 4 and conf.sum() == 60
  m = evaluate.metrics_from_confusion(conf, stats)
  np.testing.assert_allclose(m['per_class'], [0.9, 0.6, 0.5, 0.0, 0.8, 1.0])
  assert m['many'] == pytest.approx(0.75)
  assert m['medium'] == pytest.approx(0.25)
  assert m['few'] == pytest.approx(0.9)
  assert m['all'] == pytest.approx(38 / 60)
  assert m['balanced'] == pytest.approx(np.mean([0.9, 0.6, 0.5, 0.0, 0.8, 1.0]))
  table = evaluate.format_table({'x': m})
  assert '| x | 75.00 | 25.00 | 90.00 | 63.33 |' in table


def test_classes_absent_from_the_split_have_no_accuracy_and_no_nan():
  """A class without a test example: ``None`` in per_class (strict JSON, never NaN), left
  out of balanced and its shot mean; a whole shot group absent: ``None``, shown as '-';
  a class absent from one batch but present in the split is counted (the confusion
  accumulates over batches)."""
  stats = ClassStats(np.array([5000, 1500, 500, 300, 100, 50]), many_above=1000, few_below=200)
  labels = np.array([0, 0, 1, 1, 2, 3, 3])      # classes 4 and 5 (all of Few) absent
  preds = np.array([0, 1, 1, 1, 0, 3, 2])
  m = evaluate.metrics_from_confusion(evaluate.confusion_matrix(labels, preds, 6), stats)
  assert m['per_class'] == [0.5, 1.0, 0.0, 0.5, None, None]
  json.dumps(m, allow_nan=False)  # no NaN anywhere
  assert m['many'] == pytest.approx(0.75) and m['medium'] == pytest.approx(0.25)
  assert m['few'] is None and m['balanced'] == pytest.approx(0.5)
  assert '| x | 75.00 | 25.00 | - | 57.14 |' in evaluate.format_table({'x': m})
  # over batches: class 2 is absent from the first batch only
  first = evaluate.confusion_matrix(labels[:4], preds[:4], 6)
  rest = evaluate.confusion_matrix(labels[4:], preds[4:], 6)
  whole = evaluate.metrics_from_confusion(first + rest, stats)
  assert whole == m


def test_single_examples_empty_splits_and_the_header():
  """A class with one test example scores 0 or 1, a split of one example too; an empty
  split predicts nothing (int32, shape [0]); the table's header names the columns."""
  stats = ClassStats(np.array([5000, 50]), many_above=1000, few_below=200)
  m = evaluate.metrics_from_confusion(evaluate.confusion_matrix([0, 1], [0, 1], 2), stats)
  assert m['per_class'] == [1.0, 1.0] and m['few'] == 1.0 and m['all'] == 1.0
  one = evaluate.metrics_from_confusion(evaluate.confusion_matrix([1], [1], 2), stats)
  assert one['all'] == 1.0 and one['per_class'] == [None, 1.0]
  assert evaluate.format_table({'x': m}).splitlines()[:2] == [
      '| run | Many | Medium | Few | All |', '| --- | --- | --- | --- | --- |']
  model, params, batch_stats = models.create('mlp', 3, in_features=2)
  predict = evaluate.make_predict(model)
  none = evaluate.predict_split(predict, params, batch_stats, np.zeros((0, 2), np.float32))
  assert none.shape == (0,) and none.dtype == np.int32
