"""Class-count thresholds at equality, on the real CIFAR-LT counts, and schedules across
the stage switch.

CIFAR-100-LT at IF 10 has a class with exactly 100 training images and at IF 50 and 100
one with exactly 20; CIFAR-10-LT at IF 50 one with exactly 100. ``n_c < eta`` is tail,
``n_c > many_above`` is Many, ``n_c < few_below`` is Few: a class at a threshold is head,
resp. Medium.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sse_sam_jax as ssj
from sse_sam_jax.data import ClassStats, profiles
from sse_sam_jax.data.stats import SHOT_THRESHOLDS

# (classes, n_max, IF) -> total training images of the LDAM-DRW construction
TOTALS = {(10, 5000, 10): 20431, (10, 5000, 50): 13996, (10, 5000, 100): 12406,
          (100, 500, 10): 19573, (100, 500, 50): 12608, (100, 500, 100): 10847}


@pytest.mark.parametrize('key', sorted(TOTALS))
def test_cifar_lt_counts(key):
  classes, n_max, imbalance = key
  counts = profiles.long_tail_counts(n_max, classes, imbalance)
  assert sum(counts) == TOTALS[key]
  assert counts[0] == n_max and counts[-1] == n_max // imbalance
  assert all(a >= b for a, b in zip(counts, counts[1:]))


def cifar100(imbalance):
  return np.asarray(profiles.long_tail_counts(500, 100, imbalance))


@pytest.mark.parametrize('imbalance,eta', [(10, 100), (50, 20), (100, 20)])
def test_tail_threshold_at_equality(imbalance, eta):
  counts = cifar100(imbalance)
  at = np.flatnonzero(counts == eta)
  assert at.size == 1  # the real counts hold a class exactly at the threshold
  tail = ssj.tail_classes(counts, eta)
  assert not tail[at[0]]  # n_c == eta is head
  assert tail.tolist() == [int(n) < eta for n in counts]
  assert int(tail.sum()) == sum(1 for n in counts if n < eta)
  stats = ClassStats(counts)
  np.testing.assert_array_equal(stats.class_groups(eta), tail.astype(np.int32))
  # the training path's per-example groups follow the same mask
  labels = jnp.asarray([at[0], at[0] + 1, 0])
  assert ssj.example_groups(labels, tail).tolist() == [0, 1, 0]


def test_cifar10_tail_threshold_at_equality():
  counts = np.asarray(profiles.long_tail_counts(5000, 10, 50))
  assert 100 in counts.tolist()
  assert ssj.tail_classes(counts, 100).tolist() == [n < 100 for n in counts.tolist()]
  assert not ssj.tail_classes(counts, 100)[counts.tolist().index(100)]


@pytest.mark.parametrize('imbalance', [10, 50, 100])
def test_many_medium_few_at_equality(imbalance):
  counts = cifar100(imbalance)
  many_above, few_below = SHOT_THRESHOLDS['default']
  assert (many_above, few_below) == (100, 20)
  groups = ClassStats(counts, many_above, few_below).shot_groups()
  want_many = [n > 100 for n in counts.tolist()]
  want_few = [n < 20 for n in counts.tolist()]
  assert groups['many'].tolist() == want_many
  assert groups['few'].tolist() == want_few
  assert groups['medium'].tolist() == [not (m or f) for m, f in zip(want_many, want_few)]
  for edge in (100, 20):  # a class at a threshold is Medium
    for i in np.flatnonzero(counts == edge):
      assert groups['medium'][i]


def test_cifar10_shot_thresholds_at_equality():
  many_above, few_below = SHOT_THRESHOLDS['cifar10']
  assert (many_above, few_below) == (1000, 200)
  groups = ClassStats(np.array([5000, 1001, 1000, 999, 201, 200, 199, 50]),
                      many_above, few_below).shot_groups()
  assert groups['many'].tolist() == [True, True, False, False, False, False, False, False]
  assert groups['few'].tolist() == [False, False, False, False, False, False, True, True]


def test_tail_rho_schedule_follows_the_global_step_across_the_switch():
  """Stage 2 keeps its own step count; the tail radius must still be rho(global step)."""
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {'w': jax.random.normal(k[0], (5, 4)), 'b': jnp.zeros(4)}
  x = jax.random.normal(k[1], (12, 5))
  y = jnp.arange(12) % 4
  tail = np.array([False, False, True, True])
  loss_fn = lambda p: -jax.nn.log_softmax(x @ p['w'] + p['b'])[jnp.arange(12), y]
  schedule = lambda count: 0.02 * (count + 1)  # 0.02, 0.04, ... never 0
  switch = 3
  tx = ssj.sse_sam(0.05, schedule, switch_step=switch, tail_classes=tail)

  @jax.jit
  def update(state):
    return tx.update(params, state, params, loss_fn=loss_fn, labels=y)

  state = tx.init(params)
  for step in range(6):
    got, state = update(state)
    if step < switch:
      fresh = ssj.group_sam((0.05, float(schedule(step))), class_groups=tail.astype(np.int32))
    else:
      fresh = ssj.imbsam(float(schedule(step)), tail_classes=tail)
    want, _ = fresh.update(params, fresh.init(params), params, loss_fn=loss_fn, labels=y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  # the check can fail: radius schedule(0) at step 3 gives another direction
  restarted = ssj.imbsam(float(schedule(0)), tail_classes=tail)
  other, _ = restarted.update(params, restarted.init(params), params, loss_fn=loss_fn, labels=y)
  fresh = ssj.imbsam(float(schedule(3)), tail_classes=tail)
  want, _ = fresh.update(params, fresh.init(params), params, loss_fn=loss_fn, labels=y)
  assert not np.allclose(other['w'], want['w'], rtol=1e-4)


def test_step_profile_splits_an_odd_class_count_with_the_extra_class_in_the_tail():
  assert profiles.long_tail_counts(100, 5, 10, 'step') == [100, 100, 10, 10, 10]
  assert profiles.long_tail_counts(100, 4, 10, 'step') == [100, 100, 10, 10]
