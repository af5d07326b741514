"""The transforms inside users' optax compositions: correct, or refused with the fix.

Covers gradient accumulation (``ssj.microbatched``; ``optax.MultiSteps`` refused),
runtime radii (``optax.inject_hyperparams``), perturbing a subset of the parameters
(``mask=``; ``optax.masked`` / ``optax.partition`` refused), order in a chain (clipping),
``apply_if_finite``, ``lookahead`` (``ssj.bind_extra_args``), and the Flax Linen
``TrainState`` / ``nnx.Optimizer`` recipes of the README.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sse_sam_jax as ssj
from tests import golden_cases
from tests.test_optim import HID, IN, init_params  # the same tiny MLP

B, C = 16, 4
TAIL = ssj.tail_classes([400, 120, 30, 8], 50)  # classes 2 and 3 are tail


def make_batch(seed, dtype=jnp.float32):
  kx, ky = jax.random.split(jax.random.PRNGKey(100 + seed))
  x = jax.random.normal(kx, (B, IN)).astype(dtype)
  y = jax.random.randint(ky, (B,), 0, C)
  return x, y


def per_example_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return optax.softmax_cross_entropy_with_integer_labels(h @ params['w2'] + params['b2'], y)


def mean_grad(loss_fn, params):
  return jax.grad(lambda p: loss_fn(p).mean())(params)


def direction(tx, params, loss_fn, y, state=None, share=True):
  """One update of ``tx`` (a sharpness-aware transform alone) at ``params``."""
  losses, vjp_fn = jax.vjp(loss_fn, params)
  grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
  extra = dict(loss_fn=loss_fn, labels=y)
  if share:
    extra['loss_vjp'] = (losses, vjp_fn)
  state = tx.init(params) if state is None else state
  return tx.update(grads, state, params, **extra)


METHODS = {
    'sam': lambda: ssj.sam(0.3),
    'imbsam': lambda: ssj.imbsam(0.4, tail_classes=TAIL),
    'sse_sam': lambda: ssj.sse_sam(0.3, 0.4, switch_step=5, tail_classes=TAIL),
    'sse_sam_group': lambda: ssj.sse_sam(0.3, 0.4, switch_step=5, tail_classes=TAIL,
                                         normalization='group'),
}


# ---------------------------------------------------------------- accumulation
@pytest.mark.parametrize('method', sorted(METHODS))
@pytest.mark.parametrize('k', [2, 4, 16])
def test_microbatched_equals_full_batch_float64(method, k):
  with golden_cases.enable_x64():
    params = init_params(1, jnp.float64)
    x, y = make_batch(2, jnp.float64)
    full = lambda p: per_example_loss(p, (x, y))
    micro = ssj.microbatched(per_example_loss, (x, y), num_microbatches=k)
    tx = METHODS[method]()
    want, _ = jax.jit(lambda p: direction(tx, p, full, y))(params)
    got, _ = jax.jit(lambda p: direction(tx, p, micro, y))(params)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
    # and the update moves: the check can fail
    assert float(ravel_pytree(want)[0] @ ravel_pytree(want)[0]) > 1e-4


@pytest.mark.parametrize('method', ['sam', 'imbsam', 'sse_sam'])
def test_microbatched_in_a_training_loop_float32(method):
  params = init_params(3)
  tx = optax.chain(METHODS[method](), optax.add_decayed_weights(1e-3),
                   optax.sgd(0.1, momentum=0.9))

  @functools.partial(jax.jit, static_argnames='k')
  def step(params, state, x, y, k):
    loss_fn = ssj.microbatched(per_example_loss, (x, y), num_microbatches=k)
    updates, state = direction(tx, params, loss_fn, y, state)
    return optax.apply_updates(params, updates), state

  runs = {}
  for k in (1, 4):
    p, s = params, tx.init(params)
    for i in range(4):
      p, s = step(p, s, *make_batch(10 + i), k=k)
    runs[k] = p
  chex.assert_trees_all_close(runs[4], runs[1], rtol=1e-5, atol=1e-6)


def test_microbatched_unshared_clean_pass_and_errors():
  params = init_params(1)
  x, y = make_batch(2)
  micro = ssj.microbatched(per_example_loss, (x, y), 4)
  want, _ = direction(ssj.sam(0.2), params, lambda p: per_example_loss(p, (x, y)), y)
  got, _ = direction(ssj.sam(0.2), params, micro, y, share=False)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='does not divide the batch size 16'):
    ssj.microbatched(per_example_loss, (x, y), 3)
  with pytest.raises(ValueError, match='positive integer'):
    ssj.microbatched(per_example_loss, (x, y), 0)
  with pytest.raises(ValueError, match='same leading batch dimension'):
    ssj.microbatched(per_example_loss, (x, y[:8]), 2)


def test_microbatched_saves_memory():
  """Compiled temporaries of a SAM update: full batch vs 8 checkpointed microbatches."""
  wide = {'w1': jnp.zeros((64, 1024)), 'b1': jnp.zeros(1024),
          'w2': jnp.zeros((1024, C)), 'b2': jnp.zeros(C)}
  x, y = jnp.ones((512, 64)), jnp.zeros(512, jnp.int32)
  tx = ssj.sam(0.05)

  def temp_bytes(k):
    def upd(params, x, y):
      return direction(tx, params, ssj.microbatched(per_example_loss, (x, y), k), y)[0]
    compiled = jax.jit(upd).lower(wide, x, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full, micro = temp_bytes(1), temp_bytes(8)
  if full == 0:
    pytest.skip(f'jax {jax.__version__} reports no memory analysis on this backend')
  assert micro < 0.5 * full, (full, micro)


@pytest.mark.parametrize('method', sorted(METHODS))
def test_multisteps_around_a_transform_is_refused(method):
  params = init_params(1)
  x, y = make_batch(2)
  tx = optax.MultiSteps(optax.chain(METHODS[method](), optax.sgd(0.1)), every_k_schedule=2)
  state = tx.init(params)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  with pytest.raises(TypeError) as error:
    jax.jit(lambda p, s: tx.update(mean_grad(loss_fn, p), s, p, loss_fn=loss_fn,
                                   labels=y))(params, state)
  # (optax < 0.2.5 fails earlier, in MultiSteps itself, on any callable extra argument:
  # loud as well)
  assert re.search(r'MultiSteps.*ssj\.microbatched', str(error.value)) or (
      'abstract array' in str(error.value) and optax.__version__ < '0.2.5'), error.value


# ---------------------------------------------------------------- runtime radii
@pytest.mark.parametrize('name,factory,kwargs,static', [
    ('sam', ssj.sam, dict(rho=0.05), ()),
    ('imbsam', ssj.imbsam, dict(rho=0.05, tail_classes=TAIL), ('tail_classes',)),
    ('sse_sam', ssj.sse_sam, dict(head_rho=0.05, tail_rho=0.07, switch_step=3,
                                  tail_classes=TAIL), ('switch_step', 'tail_classes')),
])
def test_inject_hyperparams_radius_equals_fresh_transform(name, factory, kwargs, static):
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  state = tx.init(params)
  radii = [k for k in kwargs if k.endswith('rho')]
  update = jax.jit(lambda p, s: direction(tx, p, loss_fn, y, s))
  got0, state0 = update(params, state)
  want0, _ = direction(factory(**kwargs), params, loss_fn, y)
  chex.assert_trees_all_close(got0, want0, rtol=1e-6, atol=1e-7)
  # change the radii held in the state: the same compiled update follows them
  changed = dict(kwargs, **{r: 4.0 * kwargs[r] for r in radii})
  hyper = dict(state.hyperparams, **{r: jnp.asarray(changed[r], jnp.float32) for r in radii})
  got1, _ = update(params, state._replace(hyperparams=hyper))
  want1, _ = direction(factory(**changed), params, loss_fn, y)
  chex.assert_trees_all_close(got1, want1, rtol=1e-6, atol=1e-7)
  assert not np.allclose(ravel_pytree(got1)[0], ravel_pytree(got0)[0], atol=1e-6)
  assert update._cache_size() == 1


def test_inject_hyperparams_checks_concrete_values_and_static_args():
  params = init_params(1)
  with pytest.raises(ValueError, match='rho must be finite and >= 0'):
    optax.inject_hyperparams(ssj.sam)(rho=-0.1).init(params)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  tx = optax.inject_hyperparams(ssj.sse_sam, static_args=('tail_classes',))(
      0.05, 0.1, switch_step=3, tail_classes=TAIL)
  with pytest.raises(TypeError, match="static_args=.*'switch_step'"):
    jax.jit(lambda p, s: direction(tx, p, loss_fn, y, s))(params, tx.init(params))
  tx = optax.inject_hyperparams(ssj.imbsam)(0.05, tail_classes=TAIL)
  with pytest.raises(TypeError, match="static_args=.*'tail_classes'"):
    jax.jit(lambda p, s: direction(tx, p, loss_fn, y, s))(params, tx.init(params))
  with pytest.raises(TypeError, match='real scalar'):
    ssj.sam(jnp.ones(3))


# ---------------------------------------------------------------- parameter subsets
def ref_masked_grad_at_perturbed(loss, params, rho, keys):
  """Gradient of ``loss`` at w + rho * g_S / ||g_S||, S the leaves in ``keys``."""
  g = jax.grad(loss)(params)
  norm = jnp.sqrt(sum(jnp.sum(g[k] ** 2) for k in keys))
  moved = {k: params[k] + rho * g[k] / (norm + 1e-16) if k in keys else params[k]
           for k in params}
  return jax.grad(loss)(moved)


@pytest.mark.parametrize('mask_kind', ['tree', 'callable'])
def test_sam_mask_against_hand_reference(mask_kind):
  with golden_cases.enable_x64():
    params = init_params(1, jnp.float64)
    x, y = make_batch(2, jnp.float64)
    loss_fn = lambda p: per_example_loss(p, (x, y))
    keys = ('w2', 'b2')  # "only the classifier"
    tree = {k: k in keys for k in params}
    mask = tree if mask_kind == 'tree' else (lambda p: {k: k in keys for k in p})
    got, _ = jax.jit(lambda p: direction(ssj.sam(0.3, mask=mask), p, loss_fn, y))(params)
    want = ref_masked_grad_at_perturbed(lambda p: loss_fn(p).mean(), params, 0.3, keys)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
    unmasked, _ = direction(ssj.sam(0.3), params, loss_fn, y)
    assert not np.allclose(got['w1'], unmasked['w1'], rtol=1e-6)


def test_group_mask_against_hand_reference():
  with golden_cases.enable_x64():
    params = init_params(1, jnp.float64)
    x, y = make_batch(2, jnp.float64)
    loss_fn = lambda p: per_example_loss(p, (x, y))
    keys = ('w1', 'b1')
    is_tail = jnp.asarray(TAIL)[y].astype(jnp.float64)
    head = lambda p: jnp.sum(loss_fn(p) * (1 - is_tail)) / B
    tail = lambda p: jnp.sum(loss_fn(p) * is_tail) / B
    tx = ssj.sse_sam(0.3, 0.4, switch_step=5, tail_classes=TAIL,
                     mask={k: k in keys for k in params})
    got, _ = direction(tx, params, loss_fn, y)
    gh = ref_masked_grad_at_perturbed(head, params, 0.3, keys)
    gt = ref_masked_grad_at_perturbed(tail, params, 0.4, keys)
    chex.assert_trees_all_close(got, jax.tree.map(jnp.add, gh, gt), rtol=1e-12, atol=1e-14)


def test_mask_errors_and_all_false_is_clean_gradient():
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  got, _ = direction(ssj.sam(0.3, mask=jax.tree.map(lambda _: False, params)), params,
                     loss_fn, y)
  chex.assert_trees_all_close(got, mean_grad(loss_fn, params), rtol=1e-6)
  with pytest.raises(ValueError, match='mask must be a pytree of Python bools'):
    direction(ssj.sam(0.3, mask={'w1': True}), params, loss_fn, y)


@pytest.mark.parametrize('wrap', ['masked', 'partition'])
def test_masked_and_partition_are_refused_with_the_native_mask(wrap):
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  labels = {k: 'sam' if k.startswith('w') else 'sgd' for k in params}
  if wrap == 'masked':
    tx = optax.masked(ssj.sam(0.1), {k: v == 'sam' for k, v in labels.items()})
  else:  # optax.partition; optax.multi_transform before optax 0.2.5
    partition = getattr(optax, 'partition', None) or optax.multi_transform
    tx = partition({'sam': ssj.sam(0.1), 'sgd': optax.sgd(0.1)}, labels)
  with pytest.raises(TypeError, match=r'optax\.masked / optax\.partition.*mask='):
    tx.update(mean_grad(loss_fn, params), tx.init(params), params, loss_fn=loss_fn)


# ---------------------------------------------------------------- order and wrappers
@pytest.mark.parametrize('method', sorted(METHODS))
def test_anything_before_the_transform_is_refused(method):
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  for before in (optax.clip_by_global_norm(0.1), optax.add_decayed_weights(1e-3)):
    for tx in (optax.chain(before, METHODS[method](), optax.sgd(0.1)),
               optax.chain(before, optax.chain(METHODS[method](), optax.sgd(0.1))),
               optax.named_chain(('clip', before), ('sam', METHODS[method]()))):
      with pytest.raises(TypeError, match=r'Put it first'):
        jax.jit(lambda p, tx=tx: direction(tx, p, loss_fn, y))(params)


def test_clipping_after_the_transform_clips_the_direction():
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  raw, _ = direction(ssj.sam(0.3), params, loss_fn, y)
  norm = float(optax.tree.norm(raw)) if hasattr(optax, 'tree') else float(
      jnp.linalg.norm(ravel_pytree(raw)[0]))
  assert norm > 0.05
  clipped, _ = direction(optax.chain(ssj.sam(0.3), optax.clip_by_global_norm(0.05)), params,
                         loss_fn, y)
  chex.assert_trees_all_close(clipped, jax.tree.map(lambda g: g * 0.05 / norm, raw),
                              rtol=1e-5)


def _nan_at_perturbed_point():
  """A loss finite at w = 0, with NaN loss and gradient once ||w|| > 1."""
  x, y = jnp.ones((4, 3)), jnp.arange(4.)
  loss_fn = lambda w: (x @ w - y) ** 2 + jnp.sqrt(1.0 - jnp.sum(w ** 2))
  return jnp.zeros(3), loss_fn


def test_apply_if_finite_after_the_transform_skips_a_nan_perturbed_step():
  w, loss_fn = _nan_at_perturbed_point()
  assert np.isfinite(loss_fn(w)).all() and not np.isfinite(loss_fn(w + 2.0)).all()
  tx = optax.chain(ssj.sam(2.0), optax.apply_if_finite(optax.sgd(0.1), 3))
  state = tx.init(w)
  updates, state = jax.jit(lambda w, s: tx.update(mean_grad(loss_fn, w), s, w,
                                                  loss_fn=loss_fn))(w, state)
  np.testing.assert_array_equal(updates, np.zeros(3))
  assert int(state[0].notfinite_count) == 1 and int(state[1].notfinite_count) == 1
  # a finite perturbed point counts nothing
  tx = ssj.sam(0.1)
  _, s = tx.update(mean_grad(loss_fn, w), tx.init(w), w, loss_fn=loss_fn)
  assert int(s.notfinite_count) == 0


def test_group_transform_reports_nonfinite_perturbed_loss():
  w, loss_fn = _nan_at_perturbed_point()
  tx = ssj.imbsam(2.0)
  _, s = tx.update(w, tx.init(w), w, loss_fn=loss_fn, group_ids=jnp.array([0, 0, 1, 1]))
  assert int(s.notfinite_count) == 1


def test_apply_if_finite_around_the_transform_is_refused():
  w, loss_fn = _nan_at_perturbed_point()
  tx = optax.apply_if_finite(optax.chain(ssj.sam(2.0), optax.sgd(0.1)), 3)
  with pytest.raises(TypeError, match=r'Put it after the transform'):
    tx.update(mean_grad(loss_fn, w), tx.init(w), w, loss_fn=loss_fn)


def test_lookahead_with_bound_extra_args():
  params = init_params(1)
  batches = [make_batch(i) for i in range(4)]

  def make_tx(**bound):
    fast = optax.chain(ssj.bind_extra_args(ssj.sam(0.2), **bound), optax.sgd(0.1))
    return optax.lookahead(fast, sync_period=2, slow_step_size=0.5)

  lp = optax.LookaheadParams.init_synced(params)
  state = make_tx().init(lp)
  plain = optax.chain(ssj.sam(0.2), optax.sgd(0.1))
  fast, plain_state, slow_ref = params, plain.init(params), params
  for i, (x, y) in enumerate(batches):
    loss_fn = lambda p, x=x, y=y: per_example_loss(p, (x, y))
    updates, state = make_tx(loss_fn=loss_fn).update(mean_grad(loss_fn, lp.fast), state, lp)
    lp = optax.apply_updates(lp, updates)
    # reference: plain SAM+SGD on the fast weights, synced every 2 steps
    upd, plain_state = plain.update(mean_grad(loss_fn, fast), plain_state, fast,
                                    loss_fn=loss_fn)
    fast = optax.apply_updates(fast, upd)
    if i % 2 == 1:
      slow = jax.tree.map(lambda s, f: s + 0.5 * (f - s), slow_ref, fast)
      fast, slow_ref = slow, slow
      chex.assert_trees_all_close(lp.slow, slow, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(lp.fast, fast, rtol=1e-5, atol=1e-6)


def test_lookahead_without_bound_args_names_the_fix():
  params = init_params(1)
  x, y = make_batch(0)
  fast = optax.chain(optax.with_extra_args_support(ssj.sam(0.2)), optax.sgd(0.1))
  tx = optax.lookahead(fast, sync_period=2, slow_step_size=0.5)
  lp = optax.LookaheadParams.init_synced(params)
  with pytest.raises(TypeError, match='bind_extra_args'):
    tx.update(mean_grad(lambda p: per_example_loss(p, (x, y)), params), tx.init(lp), lp)


# ---------------------------------------------------------------- Flax recipes
def test_flax_linen_train_state_recipe():
  pytest.importorskip('flax')
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(C)(jnp.tanh(nn.Dense(HID)(x)))

  model = MLP()
  x, y = make_batch(0)
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.chain(ssj.imbsam(0.1, tail_classes=TAIL), optax.sgd(0.1))
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx)

  @jax.jit
  def train_step(state, x, y):  # the README's recipe
    def loss_fn(params):
      logits = state.apply_fn({'params': params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    losses, vjp_fn = jax.vjp(loss_fn, state.params)
    grads = vjp_fn(jnp.full_like(losses, 1 / losses.size))[0]
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         loss_fn=loss_fn, loss_vjp=(losses, vjp_fn), labels=y)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  new = train_step(state, x, y)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, x), y)
  want, _ = direction(ssj.imbsam(0.1, tail_classes=TAIL), state.params, loss_fn, y)
  chex.assert_trees_all_close(new.params, jax.tree.map(lambda p, d: p - 0.1 * d, state.params,
                                                       want), rtol=1e-5, atol=1e-6)
  assert int(new.step) == 1


def test_nnx_optimizer_recipe():
  pytest.importorskip('flax')
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(IN, HID, rngs=rngs), nnx.Linear(HID, C, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  x, y = make_batch(0)
  tx = optax.chain(ssj.sam(0.1), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  pure0 = nnx.to_pure_dict(params0)  # before the update changes the model in place

  @nnx.jit
  def train_step(model, optimizer, x, y):  # the README's recipe
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):  # params: the nnx.State of the Params
      logits = nnx.merge(graphdef, params, rest)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    grads = nnx.grad(lambda m: loss_fn(nnx.state(m, nnx.Param)).mean())(model)
    optimizer.update(model, grads, loss_fn=loss_fn)

  train_step(model, optimizer, x, y)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      nnx.merge(graphdef, p, rest)(x), y)
  loss_pure = lambda d: loss_fn(_with_pure(params0, d))
  want, _ = direction(ssj.sam(0.1), pure0, loss_pure, y)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  chex.assert_trees_all_close(got, jax.tree.map(lambda p, d: p - 0.1 * d, pure0, want),
                              rtol=1e-5, atol=1e-6)


def _with_pure(state, pure):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(state, pure)
  return state


def test_sam_takes_the_ascent_direction_from_loss_vjp_not_from_the_incoming_updates():
  """With ``loss_vjp`` the clean gradient comes from it (the trainer's shared pass);
  the incoming updates are not read."""
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  losses, vjp_fn = jax.vjp(loss_fn, params)
  tx = ssj.sam(0.3)
  other = jax.tree.map(lambda a: jnp.flip(a) + 1.0, mean_grad(loss_fn, params))
  got, _ = tx.update(other, tx.init(params), params, loss_fn=loss_fn, loss_vjp=(losses, vjp_fn))
  want, _ = direction(tx, params, loss_fn, y)
  chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_sam_equals_optax_contrib_sam_where_both_define_the_same_step():
  """``ssj.sam(rho)`` before SGD against ``optax.contrib.sam`` (opaque mode: one ascent
  step of normalised SGD with rate rho, then the outer SGD at ``w`` with the gradient at
  the perturbed point), 5 steps, float64. The two differ only in the norm's 1e-16 guard."""
  if not hasattr(getattr(optax, 'contrib', None), 'sam'):
    pytest.skip('optax.contrib.sam is not in this optax')
  rho, lr = 0.05, 0.1
  with golden_cases.enable_x64():
    params0 = golden_cases.as_float64(init_params(1, jnp.float64))
    batch = make_batch(2, jnp.float64)
    loss_fn = functools.partial(per_example_loss, batch=batch)
    mean_loss = lambda p, *_: jnp.mean(loss_fn(p))
    ours = optax.chain(ssj.sam(rho), optax.sgd(lr))
    theirs = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(),
                                                          optax.sgd(rho)),
                               sync_period=2, opaque_mode=True)
    ends = []
    for tx, extra in ((ours, dict(loss_fn=loss_fn)), (theirs, dict(grad_fn=jax.grad(mean_loss)))):
      params, state = params0, tx.init(params0)
      for _ in range(5):
        grads = jax.grad(mean_loss)(params)
        updates, state = tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
      ends.append(jax.device_get(params))
  for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(ends[1])):
    assert a.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)  # measured: 5e-16 relative
  moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(jax.tree.leaves(ends[0]),
                                                           jax.tree.leaves(params0)))
  assert moved > 1e-3


def test_flatten_around_a_transform_is_refused_with_the_fix():
  params = init_params(1)
  x, y = make_batch(2)
  loss_fn = lambda p: per_example_loss(p, (x, y))
  tx = optax.flatten(optax.chain(ssj.sam(0.05), optax.sgd(0.1)))
  with pytest.raises(TypeError, match=r'inside optax.flatten.*optax.flatten\(optax.sgd'):
    tx.update(mean_grad(loss_fn, params), tx.init(params), params, loss_fn=loss_fn)
  # the recipe the message gives works
  ok = optax.chain(ssj.sam(0.05), optax.flatten(optax.sgd(0.1)))
  updates, _ = ok.update(mean_grad(loss_fn, params), ok.init(params), params, loss_fn=loss_fn)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize('name', ['sam', 'imbsam', 'sse_sam', 'focal_sam'])
def test_one_nonfinite_example_at_the_perturbed_point_counts_the_step(name):
  """The finiteness flag is over every example (all), not any: one example's loss NaN at
  the perturbed point counts the step; a step with every example finite counts nothing."""
  x, y = jnp.ones((4, 3)), jnp.arange(4.)
  labels = jnp.array([0, 1, 2, 3])
  only_two = jnp.arange(4) == 2

  def loss_fn(w):  # example 2 (a tail example) is NaN once ||w|| > 1, the others never
    return (x @ w - y) ** 2 + jnp.where(only_two, jnp.sqrt(1.0 - jnp.sum(w ** 2)), 0.0)

  tail = ssj.tail_classes([400, 120, 30, 8], 50)  # classes 2 and 3
  tx = {'sam': ssj.sam, 'imbsam': lambda r: ssj.imbsam(r, tail_classes=tail),
        'sse_sam': lambda r: ssj.sse_sam(r, r, 3, tail_classes=tail),
        'focal_sam': lambda r: ssj.focal_sam(r, lam=1.0, gamma=1.0,
                                             class_counts=[400, 120, 30, 8])}[name]
  w = jnp.zeros(3)
  assert np.isfinite(loss_fn(w)).all() and np.isnan(loss_fn(w + 2.0)).sum() == 1
  counts = {}
  for radius in (5.0, 0.1):
    t = tx(radius)
    _, state = t.update(mean_grad(loss_fn, w), t.init(w), w, loss_fn=loss_fn, labels=labels)
    leaves = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'notfinite_count'))
              if hasattr(s, 'notfinite_count')]
    counts[radius] = sum(int(s.notfinite_count) for s in leaves)
  assert counts == {5.0: 1, 0.1: 0}, counts


def test_bind_extra_args_call_time_arguments_take_precedence():
  """A bound argument is a default: the one given at call time wins (a wrapper that
  merged them the other way round would silently use a stale loss)."""
  params = init_params(1)
  x, y = make_batch(2)
  x2, y2 = make_batch(3)
  stale = lambda p: per_example_loss(p, (x2, y2))
  fresh = lambda p: per_example_loss(p, (x, y))
  grads = mean_grad(fresh, params)
  bound = ssj.bind_extra_args(ssj.sam(0.1), loss_fn=stale)
  got, _ = bound.update(grads, bound.init(params), params, loss_fn=fresh)
  plain = ssj.sam(0.1)
  want, _ = plain.update(grads, plain.init(params), params, loss_fn=fresh)
  chex.assert_trees_all_close(got, want, rtol=0, atol=0)
  other, _ = plain.update(grads, plain.init(params), params, loss_fn=stale)
  assert not all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(got),
                                                             jax.tree.leaves(other)))
