"""The optimizers against a plain hand-written reference step, edge cases, jit and errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.flatten_util import ravel_pytree

import sse_sam_jax as ssj

B, IN, HID, C = 12, 5, 7, 4
CLASS_COUNTS = [400, 120, 30, 8]
ETA = 50  # classes 2 and 3 are tail
TAIL = ssj.tail_classes(CLASS_COUNTS, ETA)


def init_params(seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      'w1': (jax.random.normal(k1, (IN, HID)) * 0.5).astype(dtype),
      'b1': (jax.random.normal(k2, (HID,)) * 0.1).astype(dtype),
      'w2': (jax.random.normal(k3, (HID, C)) * 0.5).astype(dtype),
      'b2': jnp.zeros((C,), dtype),
  }


def make_batch(seed, labels=None):
  kx, ky = jax.random.split(jax.random.key(100 + seed))
  x = jax.random.normal(kx, (B, IN))
  y = jax.random.randint(ky, (B,), 0, C) if labels is None else jnp.asarray(labels)
  return x, y


def per_example_loss(params, x, y):
  h = jnp.tanh(x.astype(params['w1'].dtype) @ params['w1'] + params['b1'])
  return optax.softmax_cross_entropy_with_integer_labels(h @ params['w2'] + params['b2'], y)


# ----------------------------------------------------------------------------
# Reference: the update rules of method.md written out directly, one jax.grad
# per loss, flat vectors, no shared passes.
# ----------------------------------------------------------------------------
def ref_group_loss(params, x, y, in_group, normalization, weight=1.0):
  losses = per_example_loss(params, x, y)
  mask = in_group.astype(losses.dtype)
  if normalization == 'batch':
    return weight * jnp.sum(losses * mask) / x.shape[0]
  n = float(np.sum(np.asarray(in_group)))
  return weight * jnp.sum(losses * mask) / n if n > 0 else 0.0 * jnp.sum(losses)


def ref_grad_at_perturbed(loss, params, rho):
  g = jax.grad(loss)(params)
  flat_g, unravel = ravel_pytree(g)
  flat_p, _ = ravel_pytree(params)
  e = rho * flat_g / (jnp.linalg.norm(flat_g) + 1e-16)
  return ravel_pytree(jax.grad(loss)(unravel(flat_p + e)))[0], unravel


def ref_direction(method, params, x, y, *, rho=0.0, head_rho=0.0, tail_rho=0.0,
                  normalization='batch', tail_weight=1.0):
  is_tail = jnp.asarray(TAIL)[y]
  head_loss = functools.partial(ref_group_loss, x=x, y=y, in_group=~is_tail,
                                normalization=normalization)
  tail_loss = functools.partial(ref_group_loss, x=x, y=y, in_group=is_tail,
                                normalization=normalization, weight=tail_weight)
  if method == 'sgd':
    flat, unravel = ravel_pytree(jax.grad(lambda p: per_example_loss(p, x, y).mean())(params))
  elif method == 'sam':
    flat, unravel = ref_grad_at_perturbed(lambda p: per_example_loss(p, x, y).mean(), params, rho)
  else:  # imbsam is the case head_rho = 0
    gh, unravel = ref_grad_at_perturbed(head_loss, params, head_rho)
    gt, _ = ref_grad_at_perturbed(tail_loss, params, tail_rho)
    flat = gh + gt
  return unravel(flat)


def run_steps(tx, params, batches, jit=True, share_clean_pass=True):
  def step(params, state, x, y):
    loss_fn = lambda p: per_example_loss(p, x, y)
    losses, vjp_fn = jax.vjp(loss_fn, params)
    grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
    extra = dict(loss_fn=loss_fn, group_ids=ssj.example_groups(y, TAIL))
    if share_clean_pass:
      extra['loss_vjp'] = (losses, vjp_fn)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, updates
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  all_updates = []
  for x, y in batches:
    params, state, updates = step(params, state, x, y)
    all_updates.append(updates)
  return params, all_updates


# ----------------------------------------------------------------------------
class DirectionTest(chex.TestCase):

  def _check(self, tx, method, labels=None, **ref_kwargs):
    params = init_params(1)
    x, y = make_batch(3, labels)
    update = self.variant(functools.partial(
        tx.update, loss_fn=lambda p: per_example_loss(p, x, y)))
    grads = jax.grad(lambda p: per_example_loss(p, x, y).mean())(params)
    got, _ = update(grads, tx.init(params), params,
                    group_ids=ssj.example_groups(y, TAIL))
    want = ref_direction(method, params, x, y, **ref_kwargs)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, params)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
    return got

  @chex.variants(with_jit=True, without_jit=True)
  def test_sam(self):
    self._check(ssj.sam(0.05), 'sam', rho=0.05)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(normalization=('batch', 'group'), tail_weight=(1.0, 2.0))
  def test_imbsam(self, normalization, tail_weight):
    self._check(ssj.imbsam(0.1, normalization=normalization, tail_weight=tail_weight),
                'imbsam', tail_rho=0.1, normalization=normalization, tail_weight=tail_weight)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(normalization=('batch', 'group'))
  def test_sse_sam_stage1(self, normalization):
    self._check(ssj.sse_sam(0.05, 0.1, switch_step=5, normalization=normalization),
                'ssesam', head_rho=0.05, tail_rho=0.1, normalization=normalization)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sse_sam_stage2_is_imbsam(self):
    self._check(ssj.sse_sam(0.05, 0.1, switch_step=0), 'imbsam', tail_rho=0.1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_sam_two_groups_equals_sse_sam_stage1(self):
    self._check(ssj.group_sam((0.05, 0.1)), 'ssesam', head_rho=0.05, tail_rho=0.1)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('no_tail', [0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1]),
      ('no_head', [2, 3, 3, 2, 2, 3, 2, 3, 3, 2, 2, 3]))
  def test_empty_group_is_zero_gradient(self, labels):
    for normalization in ('batch', 'group'):
      self._check(ssj.sse_sam(0.05, 0.1, switch_step=3, normalization=normalization),
                  'ssesam', labels=labels, head_rho=0.05, tail_rho=0.1,
                  normalization=normalization)
      self._check(ssj.imbsam(0.1, normalization=normalization), 'imbsam', labels=labels,
                  tail_rho=0.1, normalization=normalization)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rho_zero_equals_sgd(self):
    for tx in (ssj.sam(0.0), ssj.imbsam(0.0), ssj.sse_sam(0.0, 0.0, 2),
               ssj.group_sam((0.0, 0.0, 0.0))):
      self._check(tx, 'sgd')

  @chex.variants(with_jit=True, without_jit=True)
  def test_rho_schedule(self):
    schedule = optax.constant_schedule(0.05)
    self._check(ssj.sam(schedule), 'sam', rho=0.05)
    self._check(ssj.sse_sam(schedule, optax.constant_schedule(0.1), 3), 'ssesam',
                head_rho=0.05, tail_rho=0.1)


@pytest.mark.parametrize('make_tx', [
    lambda: ssj.sam(0.05), lambda: ssj.imbsam(0.1, normalization='group'),
    lambda: ssj.sse_sam(0.05, 0.1, 1), lambda: ssj.sam_then_imbsam(0.05, 0.1, 1)])
def test_zero_gradient_gives_zero_direction(make_tx):
  """A loss that is flat in the parameters: zero perturbation, zero direction, no NaN."""
  params = init_params(0)
  x, y = make_batch(0)
  tx = make_tx()
  loss_fn = lambda p: 0.0 * per_example_loss(p, x, y) + 1.0
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(2):  # both stages of the switches
    updates, state = jax.jit(functools.partial(tx.update, loss_fn=loss_fn))(
        zeros, state, params, group_ids=ssj.example_groups(y, TAIL))
    chex.assert_trees_all_equal(updates, zeros)


def test_perturb_with_zero_direction_is_identity():
  params = init_params(0)
  chex.assert_trees_all_equal(
      ssj.perturb(params, jax.tree.map(jnp.zeros_like, params), 0.5), params)


def test_bf16_params_keep_dtype():
  params = init_params(0, jnp.bfloat16)
  batches = [make_batch(s) for s in range(3)]
  for direction in (ssj.sam(0.05), ssj.imbsam(0.1), ssj.sse_sam(0.05, 0.1, 1)):
    tx = optax.chain(direction, optax.sgd(0.1, momentum=0.9))
    new_params, updates = run_steps(tx, params, batches)
    chex.assert_trees_all_equal_dtypes(new_params, params)
    chex.assert_trees_all_equal_dtypes(updates[-1], params)
    chex.assert_tree_all_finite(new_params)
  # bf16 SSE-SAM stays close to the float32 run.
  tx = lambda: optax.chain(ssj.sse_sam(0.05, 0.1, 1), optax.sgd(0.1))
  p16, _ = run_steps(tx(), params, batches)
  p32, _ = run_steps(tx(), init_params(0, jnp.float32), batches)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), p16), p32,
                              atol=0.05)


# ----------------------------------------------------------------------------
# Stage switch.
# ----------------------------------------------------------------------------
def test_stage_switch_exactly_at_switch_step():
  """Step s < switch_step is SSE-SAM stage 1, s >= switch_step is ImbSAM, momentum carries."""
  switch, steps = 3, 6
  params0 = init_params(2)
  batches = [make_batch(s) for s in range(steps)]
  tx = optax.chain(ssj.sse_sam(0.05, 0.1, switch), optax.add_decayed_weights(1e-3),
                   optax.sgd(0.1, momentum=0.9))
  got, _ = run_steps(tx, params0, batches)

  params, momentum = params0, jax.tree.map(jnp.zeros_like, params0)
  for s, (x, y) in enumerate(batches):
    d = ref_direction('ssesam', params, x, y, head_rho=0.05 if s < switch else 0.0,
                      tail_rho=0.1)
    momentum = jax.tree.map(lambda m, g, p: 0.9 * m + g + 1e-3 * p, momentum, d, params)
    params = jax.tree.map(lambda p, m: p - 0.1 * m, params, momentum)
  chex.assert_trees_all_close(got, params, rtol=1e-5, atol=1e-6)

  # And it differs from switching one step early or late.
  for other in (switch - 1, switch + 1):
    tx_other = optax.chain(ssj.sse_sam(0.05, 0.1, other), optax.add_decayed_weights(1e-3),
                           optax.sgd(0.1, momentum=0.9))
    other_params, _ = run_steps(tx_other, params0, batches)
    assert not np.allclose(other_params['w1'], got['w1'], rtol=1e-7, atol=0)


def test_stage_switch_selects_by_count():
  tx = ssj.stage_switch([optax.scale(1.0), optax.scale(2.0), optax.scale(3.0)], [2, 2 + 3])
  state = tx.init(jnp.zeros(()))
  seen = []
  update = jax.jit(tx.update)
  for _ in range(7):
    u, state = update(jnp.ones(()), state)
    seen.append(float(u))
  assert seen == [1, 1, 2, 2, 2, 3, 3]


def test_stage_switch_equal_boundaries_skip_a_stage():
  tx = ssj.stage_switch([optax.scale(1.0), optax.scale(2.0), optax.scale(3.0)], [1, 1])
  state = tx.init(jnp.zeros(()))
  out = []
  for _ in range(3):
    u, state = tx.update(jnp.ones(()), state)
    out.append(float(u))
  assert out == [1, 3, 3]


@pytest.mark.parametrize('gamma,expected', [(0.0, 0), (0.5, 8), (0.7, 12), (1.0, 16)])
def test_switch_step_from_gamma(gamma, expected):
  assert ssj.switch_step(gamma, epochs=8, steps_per_epoch=2) == expected


def test_switch_step_reference_recipe():
  # 200 epochs, gamma 0.7: stage 2 from epoch 140 (0-based).
  assert ssj.switch_step(0.7, 200, 97) == 140 * 97


def test_gamma_zero_and_one():
  batches = [make_batch(s) for s in range(3)]
  params = init_params(4)
  chain = lambda t: optax.chain(t, optax.sgd(0.1, momentum=0.9))
  # gamma = 0: ImbSAM from the first step.
  got, _ = run_steps(chain(ssj.sse_sam(0.05, 0.1, ssj.switch_step(0.0, 3, 1))), params, batches)
  want, _ = run_steps(chain(ssj.imbsam(0.1)), params, batches)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  # gamma = 1: stage 1 throughout, i.e. group SAM with both radii.
  got, _ = run_steps(chain(ssj.sse_sam(0.05, 0.1, ssj.switch_step(1.0, 3, 1))), params, batches)
  want, _ = run_steps(chain(ssj.group_sam((0.05, 0.1))), params, batches)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_sam_then_imbsam_variant():
  batches = [make_batch(s) for s in range(4)]
  params = init_params(5)
  got, updates = run_steps(ssj.sam_then_imbsam(0.05, 0.1, 2), params, batches)
  p = params
  for s, (x, y) in enumerate(batches):
    d = (ref_direction('sam', p, x, y, rho=0.05) if s < 2
         else ref_direction('imbsam', p, x, y, tail_rho=0.1))
    chex.assert_trees_all_close(updates[s], d, rtol=2e-5, atol=1e-6)
    p = jax.tree.map(jnp.add, p, d)


def test_no_recompilation_across_the_switch():
  params = init_params(0)
  tx = optax.chain(ssj.sse_sam(0.05, 0.1, 2), optax.sgd(0.1, momentum=0.9))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y):
    loss_fn = lambda p: per_example_loss(p, x, y)
    losses, vjp_fn = jax.vjp(loss_fn, params)
    updates, state = tx.update(params, state, params, loss_fn=loss_fn,
                               loss_vjp=(losses, vjp_fn), group_ids=ssj.example_groups(y, TAIL))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for s in range(5):
    params, state = step(params, state, *make_batch(s))
  assert step._cache_size() == 1


def test_called_outside_jit_the_switch_compiles_nothing_new():
  """Eager updates (a new loss closure each step) pick the stage and the kind of step on
  the host: an eager ``lax.switch``/``lax.cond`` traced and compiled its branches anew
  at every call. The steps are those of the jitted update."""
  import logging  # pylint: disable=g-import-not-at-top
  params = init_params(3)
  batches = [make_batch(s) for s in range(4)]
  for tx in (optax.chain(ssj.sse_sam(0.05, 0.1, 2), optax.sgd(0.1, momentum=0.9)),
             optax.chain(ssj.sse_sam(0.05, 0.1, 2, sharpness_steps=ssj.looksam(every=2)),
                         optax.sgd(0.1))):
    want, _ = run_steps(tx, params, batches, jit=True)
    compiled = []
    handler = logging.Handler()
    handler.emit = lambda record, compiled=compiled: compiled.append(record.getMessage())
    logging.getLogger('jax').addHandler(handler)
    try:
      with jax.log_compiles():
        run_steps(tx, params, batches, jit=False)  # each eager op compiles on first use
        jax.jit(lambda v: v * 3.0 + 1.0)(jnp.zeros(5))  # a new function: it must be seen
        assert any(m.startswith('Compiling') for m in compiled)  # (the capture works)
        compiled.clear()
        got, _ = run_steps(tx, params, batches, jit=False)  # the same steps again
    finally:
      logging.getLogger('jax').removeHandler(handler)
    assert not [m for m in compiled if m.startswith('Compiling')], compiled[:3]
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Passes per step: counted as traces of loss_fn (each trace is one forward).
# ----------------------------------------------------------------------------
def _count_loss_passes(tx, share_clean_pass, count=0, jit=False):
  params = init_params(0)
  x, y = make_batch(0)
  calls = []

  def loss_fn(p):
    calls.append(1)
    return per_example_loss(p, x, y)

  extra = dict(loss_fn=loss_fn, group_ids=ssj.example_groups(y, TAIL))
  if share_clean_pass:
    extra['loss_vjp'] = jax.vjp(lambda p: per_example_loss(p, x, y), params)
  state = tx.init(params)
  if count:
    state = state._replace(count=jnp.asarray(count, state.count.dtype))
  update = lambda state: tx.update(params, state, params, **extra)
  if jit:
    jax.jit(update).lower(state)  # traces once
  else:
    update(state)
  return len(calls)


@pytest.mark.parametrize('tx,shared,unshared', [
    (ssj.sam(0.05), 1, 1),            # SAM reads the clean gradient from `updates`
    (ssj.sam(0.0), 0, 0),
    (ssj.imbsam(0.1), 1, 2),
    (ssj.imbsam(0.0), 0, 1),
    (ssj.group_sam((0.05, 0.1)), 2, 3),
    (ssj.group_sam((0.0, 0.0, 0.1)), 1, 2),
])
def test_forward_passes_per_update(tx, shared, unshared):
  assert _count_loss_passes(tx, True) == shared
  assert _count_loss_passes(tx, False) == unshared


def test_sse_sam_stage2_skips_head_pass():
  tx = ssj.sse_sam(0.05, 0.1, 3)
  # Outside jit the host picks the stage: stage 1 perturbs head and tail, stage 2 the tail.
  assert _count_loss_passes(tx, True) == 2
  assert _count_loss_passes(tx, True, count=3) == 1
  # Traced, lax.switch traces each branch once.
  assert _count_loss_passes(tx, True, jit=True) == 2 + 1


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('build', [
    lambda: ssj.sam(-0.1),
    lambda: ssj.sam(float('nan')),
    lambda: ssj.imbsam(-1.0),
    lambda: ssj.sse_sam(-0.05, 0.1, 10),
    lambda: ssj.sse_sam(0.05, -0.1, 10),
    lambda: ssj.sse_sam(0.05, 0.1, -1),
    lambda: ssj.sam(optax.linear_schedule(-0.1, 0.1, 10)),
    lambda: ssj.imbsam(0.1, normalization='mean'),
    lambda: ssj.imbsam(0.1, tail_weight=-1.0),
    lambda: ssj.group_sam(()),
    lambda: ssj.group_sam((0.1, 0.1), group_weights=(1.0,)),
    lambda: ssj.switch_step(-0.1, 10, 5),
    lambda: ssj.switch_step(1.5, 10, 5),
    lambda: ssj.switch_step(0.5, 0, 5),
    lambda: ssj.stage_switch([optax.identity(), optax.identity()], []),
    lambda: ssj.stage_switch([optax.identity(), optax.identity(), optax.identity()], [5, 2]),
    lambda: ssj.tail_classes([10, 5], eta=0),
    lambda: ssj.tail_classes([10, 5], eta=-3),
    lambda: ssj.tail_classes([10, 0, 5], eta=6),
    lambda: ssj.tail_classes([10, -2], eta=6),
    lambda: ssj.tail_classes([], eta=6),
])
def test_bad_construction_raises(build):
  with pytest.raises((ValueError, TypeError)):
    build()


def test_error_messages_are_clear():
  with pytest.raises(ValueError, match='rho must be finite and >= 0'):
    ssj.sam(-0.1)
  with pytest.raises(ValueError, match=r'gamma must lie in \[0, 1\]'):
    ssj.switch_step(1.2, 10, 5)
  with pytest.raises(ValueError, match=r'classes \[1\] have counts \[0\]'):
    ssj.tail_classes([10, 0], eta=5)


@pytest.mark.parametrize('tx', [ssj.sam(0.1), ssj.imbsam(0.1), ssj.sse_sam(0.1, 0.1, 1)])
def test_missing_loss_fn_raises(tx):
  params = init_params(0)
  with pytest.raises(TypeError, match='needs the keyword argument.*loss_fn'):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize('tx', [ssj.imbsam(0.1), ssj.sse_sam(0.1, 0.1, 1)])
def test_group_methods_need_group_ids(tx):
  params = init_params(0)
  x, y = make_batch(0)
  with pytest.raises(TypeError, match='group_ids'):
    tx.update(params, tx.init(params), params, loss_fn=lambda p: per_example_loss(p, x, y))


def test_loss_fn_must_return_per_example_losses():
  params = init_params(0)
  x, y = make_batch(0)
  tx = ssj.imbsam(0.1)
  with pytest.raises(ValueError, match='per-example losses'):
    tx.update(params, tx.init(params), params,
              loss_fn=lambda p: per_example_loss(p, x, y).mean(),
              group_ids=ssj.example_groups(y, TAIL))


def test_labels_with_tail_classes_equal_group_ids():
  params = init_params(0)
  x, y = make_batch(0)
  loss_fn = lambda p: per_example_loss(p, x, y)
  a, _ = ssj.imbsam(0.1, tail_classes=TAIL).update(
      params, ssj.imbsam(0.1).init(params), params, loss_fn=loss_fn, labels=y)
  b, _ = ssj.imbsam(0.1).update(params, ssj.imbsam(0.1).init(params), params,
                                loss_fn=loss_fn, group_ids=ssj.example_groups(y, TAIL))
  chex.assert_trees_all_equal(a, b)


def test_tail_classes_helper():
  np.testing.assert_array_equal(ssj.tail_classes([500, 200, 80, 30, 12], 50),
                                [False, False, False, True, True])
  np.testing.assert_array_equal(ssj.example_groups(jnp.array([0, 4, 3, 1]),
                                                   ssj.tail_classes([500, 200, 80, 30, 12], 50)),
                                [0, 1, 1, 0])


def test_static_stage_equals_in_program_switch():
  """`stage=i` (host-picked, no lax.switch) gives the same trajectory as the count switch."""
  switch = 2
  params = init_params(6)
  batches = [make_batch(s) for s in range(4)]
  tx = optax.chain(ssj.sse_sam(0.05, 0.1, switch), optax.sgd(0.1, momentum=0.9))
  want, _ = run_steps(tx, params, batches)

  state, p = tx.init(params), params
  for s, (x, y) in enumerate(batches):
    loss_fn = lambda q, x=x, y=y: per_example_loss(q, x, y)
    updates, state = tx.update(p, state, p, loss_fn=loss_fn, stage=ssj.stage_at(s, [switch]),
                               group_ids=ssj.example_groups(y, TAIL))
    p = optax.apply_updates(p, updates)
  chex.assert_trees_all_close(p, want, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='stage must be'):
    tx.update(p, state, p, loss_fn=loss_fn, stage=2, group_ids=ssj.example_groups(y, TAIL))


def test_stage_at():
  assert [ssj.stage_at(s, [2, 5]) for s in range(7)] == [0, 0, 1, 1, 1, 2, 2]
  assert [ssj.stage_at(s, [1, 1]) for s in range(3)] == [0, 2, 2]
  assert ssj.stage_at(10**6, []) == 0


def test_labels_are_validated_by_name():
  """Labels reach the group methods and Focal-SAM checked: integer dtype (not one-hot),
  rank 1, and in range when concrete; a missing ``labels=`` is named as such."""
  params = init_params(0)
  x, y = make_batch(0)
  loss_fn = lambda p: per_example_loss(p, x, y)
  tail = ssj.tail_classes([400, 120, 30, 8], 50)
  for tx in (ssj.imbsam(0.1, tail_classes=tail), ssj.sse_sam(0.05, 0.1, 3, tail_classes=tail),
             ssj.focal_sam(0.1, lam=1.0, gamma=1.0, class_counts=[400, 120, 30, 8])):
    state = tx.init(params)
    update = functools.partial(tx.update, params, state, params, loss_fn=loss_fn)
    with pytest.raises(TypeError, match=r'labels must be integer class indices.*one-hot'):
      update(labels=jax.nn.one_hot(y, 4))
    with pytest.raises(ValueError, match=r'shape \[B\], got \(12, 1\) \(squeeze'):
      update(labels=y[:, None])
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 4\)'):
      update(labels=y.at[0].set(4))
    with pytest.raises(TypeError, match=r'keyword argument\(s\) labels'):
      update()
    update(labels=y)  # and the right labels pass


def test_complex_parameters_are_refused_with_the_fix():
  params = {'w': jnp.ones((3,), jnp.complex64)}
  loss_fn = lambda p: jnp.abs(p['w']) ** 2
  tx = ssj.sam(0.05)
  with pytest.raises(TypeError, match='real parameters.*two real arrays'):
    tx.update(params, tx.init(params), params, loss_fn=loss_fn)
