"""Every option of every public transform is passed on: a generative guard.

For each factory (``sam``, ``asam``, ``imbsam``, ``group_sam``, ``sse_sam``,
``sam_then_imbsam``, ``focal_sam``) and each of its keyword options, three steps with the
option at another value must end at other parameters than with its default, in a
non-degenerate setting (momentum-free SGD on a small softmax regression whose batches hold
head and tail examples, radii that change with the step). An option added later without
an alternative value here fails the test until one is given or it is declared neutral. A
mutation run (tests/mutation_score.py) found options that were silently dropped
(``asam``'s ``sharpness_steps``, ``focal_sam``'s ``adaptive_eta`` and ``mask``,
``sam_then_imbsam``'s ``normalization``); this catches every such drop at once.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sse_sam_jax as ssj

COUNTS = np.array([50, 30, 5, 3])  # classes 2 and 3 are tail at eta 10
TAIL = COUNTS < 10
X = jax.random.normal(jax.random.key(0), (12, 5))
LABELS = jnp.array([0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 3])
PARAMS = {'w': jax.random.normal(jax.random.key(1), (5, 4)) * 0.5, 'b': jnp.zeros(4) + 0.1}


def ramp(count):
  """A radius that changes with the step: a schedule passed on with the wrong count
  (or none) gives other perturbations."""
  return 0.05 + 0.1 * jnp.minimum(count, 3)


def loss_fn(params):
  logits = X @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS)


def final_params(tx, steps=3):
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(steps):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p)))(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, labels=LABELS)
    params = optax.apply_updates(params, updates)
  return params


SHARPNESS = ssj.SharpnessSteps(every=2)
ONLY_W = {'w': True, 'b': False}
# factory -> (required arguments, {option: another value}); 'neutral' options change no number
FACTORIES = {
    'sam': (dict(rho=ramp), dict(mask=ONLY_W, adaptive_eta=0.01, sharpness_steps=SHARPNESS)),
    'asam': (dict(rho=ramp), dict(eta=0.5, mask=ONLY_W, sharpness_steps=SHARPNESS)),
    'imbsam': (dict(rho=ramp, tail_classes=TAIL),
               dict(normalization='group', tail_weight=2.0, tail_classes=COUNTS < 40,
                    mask=ONLY_W, adaptive_eta=0.01, sharpness_steps=SHARPNESS)),
    'group_sam': (dict(rhos=(0.05, ramp), class_groups=TAIL.astype(np.int32)),
                  dict(normalization='group', group_weights=(1.0, 2.0),
                       class_groups=(COUNTS < 40).astype(np.int32), mask=ONLY_W,
                       adaptive_eta=0.01, sharpness_steps=SHARPNESS, name='neutral')),
    'sse_sam': (dict(head_rho=0.05, tail_rho=ramp, switch_step=2, tail_classes=TAIL),
                dict(normalization='group', tail_weight=2.0, tail_classes=COUNTS < 40,
                     mask=ONLY_W, adaptive_eta=0.01, sharpness_steps=SHARPNESS)),
    'sam_then_imbsam': (dict(rho=0.05, tail_rho=ramp, switch_step=1, tail_classes=TAIL),
                        dict(normalization='group', tail_weight=2.0, tail_classes=COUNTS < 40,
                             mask=ONLY_W, adaptive_eta=0.01, sharpness_steps=SHARPNESS)),
    'focal_sam': (dict(rho=ramp, lam=1.0, gamma=2.0, class_counts=COUNTS),
                  dict(lam=0.5, gamma=1.0, class_counts=COUNTS[::-1].copy(), mask=ONLY_W,
                       adaptive_eta=0.01, sharpness_steps=SHARPNESS)),
}
CASES = [(f, option) for f, (required, alternatives) in FACTORIES.items()
         for option in inspect.signature(getattr(ssj, f)).parameters
         if option not in required or option in alternatives]


def test_every_option_of_every_factory_has_an_alternative():
  for name, (required, alternatives) in FACTORIES.items():
    options = set(inspect.signature(getattr(ssj, name)).parameters) - set(required)
    assert options <= set(alternatives), (name, sorted(options - set(alternatives)))


@pytest.mark.parametrize('factory,option', CASES)
def test_an_option_at_another_value_changes_the_steps(factory, option):
  required, alternatives = FACTORIES[factory]
  if option not in alternatives:
    pytest.fail(f'{factory}({option}=...) has no alternative value in FACTORIES; give one '
                "(or 'neutral' if it changes no number)")
  make = getattr(ssj, factory)
  base = final_params(optax.chain(make(**required), optax.sgd(0.5)))
  other = final_params(optax.chain(make(**{**required, option: alternatives[option]}),
                                   optax.sgd(0.5)))
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(base), jax.tree.leaves(other)))
  if isinstance(alternatives[option], str) and alternatives[option] == 'neutral':
    assert moved == 0.0, (factory, option, moved)
  else:
    assert moved > 1e-6, f'{factory}: {option}={alternatives[option]!r} changed nothing'


def test_a_radius_schedule_sees_the_global_step_in_every_stage():
  """``sam_then_imbsam``'s stage 2 reads its tail radius at the global step (its schedule
  is shifted back by the switch): a schedule that is 0 before step 3 perturbs nothing
  in stage 2's first steps, and the same run with a constant 0 radius ends equal."""
  late = lambda count: jnp.where(count >= 3, 0.3, 0.0)
  kw = dict(rho=0.05, switch_step=1, tail_classes=TAIL)
  scheduled = final_params(optax.chain(ssj.sam_then_imbsam(tail_rho=late, **kw),
                                       optax.sgd(0.5)))
  zero = final_params(optax.chain(ssj.sam_then_imbsam(tail_rho=0.0, **kw), optax.sgd(0.5)))
  for a, b in zip(jax.tree.leaves(scheduled), jax.tree.leaves(zero)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  four = final_params(optax.chain(ssj.sam_then_imbsam(tail_rho=late, **kw), optax.sgd(0.5)), 4)
  four_zero = final_params(optax.chain(ssj.sam_then_imbsam(tail_rho=0.0, **kw),
                                       optax.sgd(0.5)), 4)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(four), jax.tree.leaves(four_zero))) > 1e-6


def test_a_zero_radius_runs_no_perturbed_pass():
  """A static radius of 0 costs no forward pass at the perturbed point: counted at trace
  time, each factory with one radius calls the loss one time fewer at 0 than at 0.1."""
  makers = {'sam': ssj.sam,
            'focal_sam': lambda rho: ssj.focal_sam(rho, lam=1.0, gamma=2.0, class_counts=COUNTS),
            'imbsam': lambda rho: ssj.imbsam(rho, tail_classes=TAIL)}
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p)))(PARAMS)
  for name, make in makers.items():
    passes = {}
    for rho in (0.0, 0.1):
      calls = []

      def counting(params, calls=calls):
        calls.append(1)
        return loss_fn(params)

      tx = make(rho)
      tx.update(grads, tx.init(PARAMS), PARAMS, loss_fn=counting, labels=LABELS)
      passes[rho] = len(calls)
    assert passes[0.0] == passes[0.1] - 1, (name, passes)


def test_a_wrong_aux_sink_names_the_transform():
  tx = ssj.focal_sam(0.1, lam=1.0, gamma=2.0, class_counts=COUNTS)
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p)))(PARAMS)
  with pytest.raises(TypeError, match='focal_sam: perturbed_aux must be a list'):
    tx.update(grads, tx.init(PARAMS), PARAMS, loss_fn=loss_fn, labels=LABELS,
              perturbed_aux=())


def test_eta_below_one_is_a_valid_tail_threshold():
  assert ssj.tail_classes([5, 1], eta=0.5).tolist() == [False, False]
  assert ssj.tail_classes([5, 1], eta=1.5).tolist() == [False, True]
  with pytest.raises(ValueError):
    ssj.tail_classes([5, 1], eta=0.0)


# ---------------------------------------------------------------------------------------
# What the mutation run's other survivors showed untested
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,make', [
    ('sam', lambda: ssj.sam(0.1)),
    ('focal_sam', lambda: ssj.focal_sam(0.1, lam=1.0, gamma=2.0, class_counts=COUNTS))])
def test_errors_name_the_transform_the_user_wrote(name, make):
  tx = make()
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p)))(PARAMS)
  with pytest.raises(TypeError, match=f'^{name}: perturbed_aux must be a list'):
    tx.update(grads, tx.init(PARAMS), PARAMS, loss_fn=loss_fn, labels=LABELS,
              perturbed_aux=())
  masked = optax.masked(make(), {'w': True, 'b': False})
  with pytest.raises(TypeError, match=rf'ssj\.{name} inside optax\.masked'):
    masked.update(grads, masked.init(PARAMS), PARAMS, loss_fn=loss_fn, labels=LABELS)


def test_group_sam_without_a_loss_says_loss_fn():
  tx = ssj.group_sam((0.1, 0.1), name='my_group_sam')
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p)))(PARAMS)
  with pytest.raises(TypeError, match=r'my_group_sam\.update\(\) needs the keyword '
                                      r'argument\(s\) loss_fn'):
    tx.update(grads, tx.init(PARAMS), PARAMS, group_ids=jnp.zeros(12, jnp.int32))


def test_class_weights_summing_below_one_are_not_clipped():
  """PyTorch's weighted mean divides by the batch's weight sum, however small."""
  from sse_sam_jax import losses
  z = jnp.zeros((2, 3))
  y = jnp.array([0, 1])
  got = losses.cross_entropy(z, y, class_weights=np.array([0.1, 0.1, 0.1]))
  np.testing.assert_allclose(got, [np.log(3.0)] * 2, rtol=1e-6)  # (0.1 l) * 2 / 0.2


def test_tree_dot_accumulates_low_precision_leaves_in_float32():
  from sse_sam_jax.optim import tree_math
  a = {'x': jnp.full((4096,), 1.0 + 2 ** -7, jnp.bfloat16), 'y': jnp.ones(3, jnp.bfloat16)}
  dot = tree_math.tree_dot(a, a)
  assert dot.dtype == jnp.float32 and tree_math.accumulation_dtype(a) == jnp.float32
  want = 4096 * float((1.0 + 2 ** -7) ** 2) + 3
  assert abs(float(dot) - want) / want < 1e-6  # a bfloat16 sum would be off by ~1e-3
  assert tree_math.tree_dot({}, {}).dtype == jnp.float32  # nothing to add: a float32 zero


def test_stage_switch_and_microbatches_say_what_is_wrong():
  with pytest.raises(ValueError, match='^stage_switch needs at least one transformation'):
    ssj.stage_switch([], [])
  per_example = lambda params, batch: loss_fn(params)
  with pytest.raises(ValueError, match='^batch has no arrays'):
    ssj.microbatched(per_example, {}, 2)
  with pytest.raises(ValueError, match='the same leading batch dimension'):
    ssj.microbatched(per_example, {'x': jnp.float32(1.0)}, 1)


def test_dtypes_hold_in_float64_mode():
  """With x64 on, a dot product accumulates in the wider of its two trees' dtypes (in
  either order), float32 trees stay float32, and a padded batch's class weights keep the
  losses' dtype."""
  from sse_sam_jax import losses
  from sse_sam_jax.optim import tree_math
  with jax.enable_x64(True):
    f32, f64 = {'x': jnp.ones(3, jnp.float32)}, {'x': jnp.ones(3, jnp.float64)}
    assert tree_math.tree_dot(f32, f32).dtype == jnp.float32
    assert tree_math.tree_dot(f64, f32).dtype == jnp.float64
    assert tree_math.tree_dot(f32, f64).dtype == jnp.float64
    weighted = losses.apply_class_weights(jnp.ones(4, jnp.float32), jnp.array([0, 1, 1, 0]),
                                          np.array([1.0, 2.0]), mask=jnp.array([1, 1, 1, 0], bool))
    assert weighted.dtype == jnp.float32


def test_a_single_stage_switch_runs_under_jit():
  tx = ssj.stage_switch([ssj.sam(0.1)], [])
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p)))(PARAMS)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
  updates, _ = update(grads, tx.init(PARAMS), PARAMS)
  want, _ = ssj.sam(0.1).update(grads, ssj.sam(0.1).init(PARAMS), PARAMS, loss_fn=loss_fn)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
