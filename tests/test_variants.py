"""The SAM variants of issue 16 against hand-written reference steps: ASAM (adaptive
ascent step) for SAM and every group of the group methods, LookSAM-style reuse of the
sharpness component and sharpness steps on a random fraction, and the collection of
the perturbed passes' aux (BatchNorm statistics of a perturbed pass)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sse_sam_jax as ssj
from sse_sam_jax.optim import sharpness_reuse
from tests import golden_cases
from tests.test_optim import IN, C, make_batch  # the same batches as the optimizer tests

HID = 7
TAIL = ssj.tail_classes([400, 120, 30, 8], 50)  # classes 2 and 3 are tail


def init_params(seed=0, dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  return {
      'dense1': {'kernel': (jax.random.normal(k1, (IN, HID)) * 0.5).astype(dtype),
                 'bias': (jax.random.normal(k2, (HID,)) * 0.1).astype(dtype)},
      'dense2': {'kernel': (jax.random.normal(k3, (HID, C)) * 0.5).astype(dtype),
                 'bias': (jax.random.normal(k4, (C,)) * 0.1).astype(dtype)},
  }


def per_example_loss(params, x, y):
  p1, p2 = params['dense1'], params['dense2']
  h = jnp.tanh(x.astype(p1['kernel'].dtype) @ p1['kernel'] + p1['bias'])
  return optax.softmax_cross_entropy_with_integer_labels(h @ p2['kernel'] + p2['bias'], y)


# ----------------------------------------------------------------------------
# References, written out from the papers' rules leaf by leaf, one jax.grad per loss.
# ----------------------------------------------------------------------------
def ref_asam_grad(loss, params, rho, eta):
  """ASAM's official ascent step: T = |w| + eta on weights (not biases),
  eps = rho T^2 g / ||T g||; the gradient at w + eps."""
  g = jax.grad(loss)(params)
  t = {layer: {'kernel': jnp.abs(params[layer]['kernel']) + eta,
               'bias': jnp.ones_like(params[layer]['bias'])} for layer in params}
  tg = jax.tree.map(lambda a, b: a * b, t, g)
  norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(tg))) + 1e-16
  eps = jax.tree.map(lambda ti, tgi: rho * ti * tgi / norm, t, tg)
  return jax.grad(loss)(jax.tree.map(jnp.add, params, eps))


def group_loss(params, x, y, tail):
  losses = per_example_loss(params, x, y)
  in_group = jnp.asarray(TAIL)[y] == tail
  return jnp.sum(losses * in_group) / x.shape[0]


def ref_asam_direction(method, params, x, y, *, rho=0.0, head_rho=0.0, tail_rho=0.0, eta):
  if method == 'sam':
    return ref_asam_grad(lambda p: per_example_loss(p, x, y).mean(), params, rho, eta)
  head = ref_asam_grad(functools.partial(group_loss, x=x, y=y, tail=False), params, head_rho,
                       eta)
  tail = ref_asam_grad(functools.partial(group_loss, x=x, y=y, tail=True), params, tail_rho,
                       eta)
  return jax.tree.map(jnp.add, head, tail)


class AsamTest(chex.TestCase):

  def _check(self, tx, method, labels=None, dtype=jnp.float32, **ref_kwargs):
    params = init_params(1, dtype)
    x, y = make_batch(3, labels)
    loss_fn = lambda p: per_example_loss(p, x, y)
    update = self.variant(functools.partial(tx.update, loss_fn=loss_fn))
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    got, _ = update(grads, tx.init(params), params, group_ids=ssj.example_groups(y, TAIL))
    chex.assert_trees_all_equal_shapes_and_dtypes(got, params)
    chex.assert_tree_all_finite(got)
    if dtype == jnp.float32:
      want = ref_asam_direction(method, params, x, y, **ref_kwargs)
      chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
    return got

  @chex.variants(with_jit=True, without_jit=True)
  def test_asam(self):
    self._check(ssj.asam(0.5), 'sam', rho=0.5, eta=0.01)
    self._check(ssj.sam(0.3, adaptive_eta=0.1), 'sam', rho=0.3, eta=0.1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_adaptive_group_methods(self):
    self._check(ssj.imbsam(0.5, adaptive_eta=0.01), 'group', tail_rho=0.5, eta=0.01)
    self._check(ssj.sse_sam(0.3, 0.5, switch_step=5, adaptive_eta=0.01), 'group',
                head_rho=0.3, tail_rho=0.5, eta=0.01)
    self._check(ssj.group_sam((0.3, 0.5), adaptive_eta=0.01), 'group',
                head_rho=0.3, tail_rho=0.5, eta=0.01)

  @chex.variants(with_jit=True, without_jit=True)
  def test_adaptive_empty_groups(self):
    for labels in ([0, 1] * 6, [2, 3] * 6):  # no tail, no head
      self._check(ssj.sse_sam(0.3, 0.5, switch_step=5, adaptive_eta=0.01), 'group',
                  labels=labels, head_rho=0.3, tail_rho=0.5, eta=0.01)

  @chex.variants(with_jit=True, without_jit=True)
  def test_adaptive_bf16(self):
    got = self._check(ssj.sse_sam(0.3, 0.5, switch_step=5, adaptive_eta=0.01), 'group',
                      dtype=jnp.bfloat16)
    want = ref_asam_direction('group', init_params(1), *make_batch(3), head_rho=0.3,
                              tail_rho=0.5, eta=0.01)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), got), want,
                                atol=0.05)


def test_adaptive_zero_gradient_and_rho_zero():
  params = init_params(0)
  x, y = make_batch(0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  flat = lambda p: 0.0 * per_example_loss(p, x, y) + 1.0
  for tx in (ssj.asam(0.5), ssj.sse_sam(0.3, 0.5, 2, adaptive_eta=0.01)):
    got, _ = jax.jit(functools.partial(tx.update, loss_fn=flat))(
        zeros, tx.init(params), params, group_ids=ssj.example_groups(y, TAIL))
    chex.assert_trees_all_equal(got, zeros)
  # rho = 0: the clean gradient, whatever eta.
  loss_fn = lambda p: per_example_loss(p, x, y)
  grads = jax.grad(lambda p: loss_fn(p).mean())(params)
  got, _ = ssj.asam(0.0).update(grads, ssj.asam(0.0).init(params), params, loss_fn=loss_fn)
  chex.assert_trees_all_equal(got, grads)


def test_adaptive_leaves_skip_biases_only():
  marks = ssj.adaptive_leaves({'conv': {'kernel': 1, 'bias': 2}, 'bn': {'scale': 3, 'bias': 4},
                               'head': 5})
  assert marks == {'conv': {'kernel': True, 'bias': False},
                   'bn': {'scale': True, 'bias': False}, 'head': True}
  assert ssj.adaptive_leaves(jnp.ones(3)) is True


def test_adaptive_eta_zero_on_scale_invariant_direction():
  """With eta = 0 the ascent step of a kernel scales with the kernel: scaling the
  weights by c scales ASAM's perturbation by c (the scale invariance ASAM is for)."""
  w = {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]])}
  d = {'kernel': jnp.array([[0.3, 0.1], [-0.2, 0.4]])}
  eps1 = jax.tree.map(jnp.subtract, ssj.perturb(w, d, 0.5, adaptive_eta=0.0), w)
  w2 = jax.tree.map(lambda a: 4.0 * a, w)
  d2 = jax.tree.map(lambda a: a / 4.0, d)  # the gradient of the rescaled network
  eps2 = jax.tree.map(jnp.subtract, ssj.perturb(w2, d2, 0.5, adaptive_eta=0.0), w2)
  chex.assert_trees_all_close(eps2, jax.tree.map(lambda a: 4.0 * a, eps1), rtol=1e-5)


@pytest.mark.parametrize('eta', [-0.1, float('nan'), 'a', True])
def test_bad_adaptive_eta_raises(eta):
  with pytest.raises(ValueError, match='adaptive_eta'):
    ssj.sam(0.5, adaptive_eta=eta)


# ----------------------------------------------------------------------------
# Sharpness steps: LookSAM reuse, random fraction.
# ----------------------------------------------------------------------------
def _tree_dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _norm(a):
  return jnp.sqrt(_tree_dot(a, a))


def _unit_perturbed_grad(loss, params, rho):
  g = jax.grad(loss)(params)
  n = _norm(g) + 1e-16
  return jax.grad(loss)(jax.tree.map(lambda p, gi: p + rho * gi / n, params, g))


def ref_looksam_run(method, params, batches, *, rho, every, alpha, lr, switch=None,
                    head_rho=0.0, fraction_steps=None, measured=False):
  """LookSAM (Liu et al. 2022, Algorithm 1) with plain SGD, written out step by step.
  For the group methods g_s is the sum of the group directions and g the sum of the
  clean group gradients; SSE-SAM's stage 2 counts from the switch."""
  sharp, g0_norm = jax.tree.map(jnp.zeros_like, params), 0.0
  for t, (x, y) in enumerate(batches):
    mean = lambda p, x=x, y=y: per_example_loss(p, x, y).mean()
    g = jax.grad(mean)(params)
    stage2 = switch is not None and t >= switch
    local = t - switch if stage2 else t
    full = local % every == 0 if fraction_steps is None else t in fraction_steps
    if stage2:
      sharp = sharp if local else jax.tree.map(jnp.zeros_like, params)
      g0_norm = g0_norm if local else 0.0
    if full:
      if method == 'sam':
        gs = _unit_perturbed_grad(mean, params, rho)
      else:
        h = functools.partial(group_loss, x=x, y=y, tail=False)
        tl = functools.partial(group_loss, x=x, y=y, tail=True)
        hr = 0.0 if stage2 else head_rho
        gh = _unit_perturbed_grad(h, params, hr) if hr else jax.grad(h)(params)
        gs = jax.tree.map(jnp.add, gh, _unit_perturbed_grad(tl, params, rho))
      coef = _tree_dot(g, gs) / (_tree_dot(g, g) + 1e-16)
      sharp = jax.tree.map(lambda s, gi, coef=coef: s - coef * gi, gs, g)
      g0_norm = _norm(g)
      d = gs
    else:
      scale = alpha * _norm(g) / ((g0_norm if measured else _norm(sharp)) + 1e-16)
      d = jax.tree.map(lambda gi, v, scale=scale: gi + scale * v, g, sharp)
    params = jax.tree.map(lambda p, di: p - lr * di, params, d)
  return params


def run_chain(tx, params, batches, *, static=False, direction=None):
  """Jitted steps of ``tx``; ``static``: the kind of step decided on the host
  (``sharpness_step_at``) and fixed in the program, one program per kind."""
  def step(params, state, x, y, kind):
    loss_fn = lambda p: per_example_loss(p, x, y)
    losses, vjp_fn = jax.vjp(loss_fn, params)
    grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
    extra = dict(loss_fn=loss_fn, loss_vjp=(losses, vjp_fn),
                 group_ids=ssj.example_groups(y, TAIL))
    if kind is not None:
      extra['sharpness_step'] = kind
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  step = jax.jit(step, static_argnums=4)
  state = tx.init(params)
  for t, (x, y) in enumerate(batches):
    kind = ssj.sharpness_step_at(direction, t) if static else None
    params, state = step(params, state, x, y, kind)
  return params, state


BATCHES = [make_batch(s) for s in range(7)]


@pytest.mark.parametrize('static', [False, True])
def test_looksam_sam_matches_reference(static):
  steps = ssj.looksam(every=3, alpha=0.7)
  direction = ssj.sam(0.1, sharpness_steps=steps)
  got, state = run_chain(optax.chain(direction, optax.sgd(0.2)), init_params(2), BATCHES,
                         static=static, direction=direction)
  want = ref_looksam_run('sam', init_params(2), BATCHES, rho=0.1, every=3, alpha=0.7, lr=0.2)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  assert isinstance(state[0], ssj.SharpnessReuseState)


@pytest.mark.parametrize('static', [False, True])
def test_looksam_sse_sam_matches_reference_across_the_switch(static):
  steps = ssj.looksam(every=3, alpha=0.5)
  direction = ssj.sse_sam(0.05, 0.2, switch_step=4, sharpness_steps=steps)
  got, _ = run_chain(optax.chain(direction, optax.sgd(0.2)), init_params(3), BATCHES,
                     static=static, direction=direction)
  want = ref_looksam_run('group', init_params(3), BATCHES, rho=0.2, head_rho=0.05, every=3,
                         alpha=0.5, lr=0.2, switch=4)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  assert [ssj.sharpness_step_at(direction, t) for t in range(7)] == [
      True, False, False, True, True, False, False]


@pytest.mark.parametrize('static', [False, True])
def test_measured_scale_matches_reference_across_the_switch(static):
  steps = ssj.SharpnessSteps(every=3, alpha=1.0, scale='measured')
  direction = ssj.sse_sam(0.05, 0.2, switch_step=4, sharpness_steps=steps)
  got, _ = run_chain(optax.chain(direction, optax.sgd(0.2)), init_params(3), BATCHES,
                     static=static, direction=direction)
  want = ref_looksam_run('group', init_params(3), BATCHES, rho=0.2, head_rho=0.05, every=3,
                         alpha=1.0, lr=0.2, switch=4, measured=True)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  looksam, _ = run_chain(optax.chain(ssj.sse_sam(0.05, 0.2, switch_step=4,
                                                 sharpness_steps=ssj.looksam(3, 1.0)),
                                     optax.sgd(0.2)), init_params(3), BATCHES)
  assert not np.allclose(jax.tree.leaves(looksam)[0], jax.tree.leaves(got)[0])


def test_random_fraction_matches_reference_and_host_choice():
  steps = ssj.random_fraction(0.4, alpha=0.0, seed=7)
  direction = ssj.imbsam(0.2, sharpness_steps=steps)
  chosen = {t for t in range(7) if ssj.sharpness_step_at(direction, t)}
  assert 0 < len(chosen) < 7
  got, _ = run_chain(optax.chain(direction, optax.sgd(0.2)), init_params(4), BATCHES)
  want = ref_looksam_run('group', init_params(4), BATCHES, rho=0.2, every=1, alpha=0.0,
                         lr=0.2, fraction_steps=chosen)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


def test_every_step_exact_is_the_exact_method():
  for exact, cheap in [(ssj.sam(0.1), ssj.sam(0.1, sharpness_steps=ssj.looksam(every=1))),
                       (ssj.sse_sam(0.05, 0.1, 3),
                        ssj.sse_sam(0.05, 0.1, 3, sharpness_steps=ssj.looksam(every=1)))]:
    a, _ = run_chain(optax.chain(exact, optax.sgd(0.2)), init_params(5), BATCHES)
    b, _ = run_chain(optax.chain(cheap, optax.sgd(0.2)), init_params(5), BATCHES)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('fraction', [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize('seed', [0, 12345, 2 ** 32 - 1])
def test_host_and_program_choose_the_same_steps(fraction, seed):
  steps = ssj.SharpnessSteps(every=2, fraction=fraction, alpha=0.7, seed=seed)
  counts = np.arange(20000)
  host = np.array([ssj.is_sharpness_step(int(c), steps) for c in counts])
  traced = np.asarray(jax.jit(lambda c: sharpness_reuse.traced_is_sharpness_step(c, steps))(
      jnp.asarray(counts, jnp.int32)))
  np.testing.assert_array_equal(host, traced)
  assert not host[1::2].any()
  assert abs(host[::2].mean() - fraction) < 0.02


def test_reuse_zero_gradient_and_bf16():
  params = init_params(0)
  x, y = make_batch(0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  flat = lambda p: 0.0 * per_example_loss(p, x, y) + 1.0
  tx = ssj.sse_sam(0.05, 0.1, 2, sharpness_steps=ssj.looksam(every=2))
  state = tx.init(params)
  for _ in range(4):
    got, state = jax.jit(functools.partial(tx.update, loss_fn=flat))(
        zeros, state, params, group_ids=ssj.example_groups(y, TAIL))
    chex.assert_trees_all_equal(got, zeros)
  p16 = init_params(0, jnp.bfloat16)
  direction = ssj.sse_sam(0.05, 0.1, 2, sharpness_steps=ssj.looksam(every=2))
  new, state = run_chain(optax.chain(direction, optax.sgd(0.1)), p16, BATCHES[:4])
  chex.assert_trees_all_equal_dtypes(new, p16)
  chex.assert_tree_all_finite(new)


def test_reuse_step_costs_no_perturbed_pass():
  params = init_params(0)
  x, y = make_batch(0)
  calls = []

  def loss_fn(p):
    calls.append(1)
    return per_example_loss(p, x, y)

  tx = ssj.sse_sam(0.05, 0.1, 3, sharpness_steps=ssj.looksam(every=4))
  extra = dict(loss_fn=loss_fn, group_ids=ssj.example_groups(y, TAIL),
               loss_vjp=jax.vjp(lambda p: per_example_loss(p, x, y), params))
  for kind, passes in [(True, 2), (False, 0)]:
    calls.clear()
    tx.update(params, tx.init(params), params, stage=0, sharpness_step=kind, **extra)
    assert len(calls) == passes


@pytest.mark.parametrize('bad', [
    dict(every=0), dict(every=1.5), dict(fraction=0.0), dict(fraction=1.2),
    dict(alpha=-1.0), dict(alpha=float('inf')), dict(seed=-1), dict(scale='norm')])
def test_bad_sharpness_steps_raise(bad):
  with pytest.raises(ValueError, match='sharpness_steps'):
    ssj.sam(0.05, sharpness_steps=ssj.SharpnessSteps(**bad))


# ----------------------------------------------------------------------------
# The perturbed passes' aux.
# ----------------------------------------------------------------------------
def test_perturbed_aux_is_collected_in_pass_order():
  params = init_params(0)
  x, y = make_batch(0)
  loss_fn = lambda p: (per_example_loss(p, x, y), p['dense2']['bias'])
  clean = jax.vjp(lambda p: per_example_loss(p, x, y), params)
  for tx, stage, n in [(ssj.sam(0.1), None, 1), (ssj.imbsam(0.1), None, 1),
                       (ssj.sse_sam(0.05, 0.1, 3), 0, 2), (ssj.sse_sam(0.05, 0.1, 3), 1, 1)]:
    aux = []
    extra = dict(loss_fn=loss_fn, loss_vjp=clean, group_ids=ssj.example_groups(y, TAIL),
                 perturbed_aux=aux)
    if stage is not None:
      extra['stage'] = stage
    tx.update(params, tx.init(params), params, **extra)
    assert len(aux) == n
    assert not np.allclose(aux[-1], params['dense2']['bias'])  # taken at perturbed params


def test_perturbed_aux_needs_a_static_kind_with_reuse():
  params = init_params(0)
  x, y = make_batch(0)
  loss_fn = lambda p: (per_example_loss(p, x, y), ())
  tx = ssj.sam(0.1, sharpness_steps=ssj.looksam())
  with pytest.raises(ValueError, match='static sharpness_step'):  # traced: in-program choice
    jax.jit(lambda s: tx.update(params, s, params, loss_fn=loss_fn, perturbed_aux=[])
            ).lower(tx.init(params))
  aux = []  # outside jit the count is known: the host picks (count 0: a sharpness step)
  tx.update(params, tx.init(params), params, loss_fn=loss_fn, perturbed_aux=aux)
  assert len(aux) == 1
  aux = []
  tx.update(params, tx.init(params), params, loss_fn=loss_fn, perturbed_aux=aux,
            sharpness_step=False)
  assert aux == []


# ----------------------------------------------------------------------------
# Focal-SAM: class-weighted sharpness in one perturbed pass.
# ----------------------------------------------------------------------------
COUNTS = [400, 120, 30, 8]


def ref_focal_direction(params, x, y, *, rho, lam, gamma):
  """Li et al. (2025), Algorithm 1, written out: g = grad L - lam grad L^g + lam grad L^g(w+e)."""
  pi = np.asarray(COUNTS, np.float64) / np.sum(COUNTS)
  w = jnp.asarray((1 - pi) ** gamma, jax.tree.leaves(params)[0].dtype)[y]
  mean = lambda p: per_example_loss(p, x, y).mean()
  focal = lambda p: jnp.sum(w * per_example_loss(p, x, y)) / x.shape[0]
  at = _unit_perturbed_grad(focal, params, rho)
  return jax.tree.map(lambda a, b, c: a - lam * b + lam * c, jax.grad(mean)(params),
                      jax.grad(focal)(params), at)


class FocalSamTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference(self):
    params = init_params(1)
    for labels in (None, [0, 1] * 6, [3] * 12):  # all classes, no tail, one class
      x, y = make_batch(3, labels)
      tx = ssj.focal_sam(0.1, lam=0.8, gamma=2.0, class_counts=COUNTS)
      got, _ = self.variant(functools.partial(
          tx.update, loss_fn=lambda p, x=x, y=y: per_example_loss(p, x, y)))(
              params, tx.init(params), params, labels=y)
      chex.assert_trees_all_close(
          got, ref_focal_direction(params, x, y, rho=0.1, lam=0.8, gamma=2.0),
          rtol=2e-5, atol=1e-6)

  def test_matches_reference_in_float64(self):
    """The class weights stay float64 under float64 (they were rounded to float32)."""
    with golden_cases.enable_x64():
      params = golden_cases.as_float64(init_params(1))
      x, y = make_batch(3)
      x = x.astype(jnp.float64)
      tx = ssj.focal_sam(0.1, lam=0.8, gamma=2.0, class_counts=COUNTS)
      got, _ = tx.update(params, tx.init(params), params, labels=y,
                         loss_fn=lambda p: per_example_loss(p, x, y))
      want = ref_focal_direction(params, x, y, rho=0.1, lam=0.8, gamma=2.0)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gamma_zero_lam_one_is_sam(self):
    params = init_params(2)
    x, y = make_batch(4)
    loss_fn = lambda p: per_example_loss(p, x, y)
    grads = jax.grad(lambda p: loss_fn(p).mean())(params)
    focal = ssj.focal_sam(0.1, lam=1.0, gamma=0.0, class_counts=COUNTS)
    sam = ssj.sam(0.1)
    a, _ = self.variant(functools.partial(focal.update, loss_fn=loss_fn))(
        grads, focal.init(params), params, labels=y)
    b, _ = self.variant(functools.partial(sam.update, loss_fn=loss_fn))(
        grads, sam.init(params), params)
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6)


def test_focal_sam_zero_gradient_bf16_and_errors():
  params = init_params(0)
  x, y = make_batch(0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = ssj.focal_sam(0.1, lam=1.0, gamma=1.0, class_counts=COUNTS)
  got, _ = jax.jit(functools.partial(
      tx.update, loss_fn=lambda p: 0.0 * per_example_loss(p, x, y) + 1.0))(
          zeros, tx.init(params), params, labels=y)
  chex.assert_trees_all_equal(got, zeros)
  p16 = init_params(0, jnp.bfloat16)
  got, _ = tx.update(p16, tx.init(p16), p16, loss_fn=lambda p: per_example_loss(p, x, y),
                     labels=y)
  chex.assert_trees_all_equal_dtypes(got, p16)
  chex.assert_tree_all_finite(got)
  with pytest.raises(ValueError, match='class_counts'):
    ssj.focal_sam(0.1, lam=1.0, gamma=1.0, class_counts=[10, 0])
  with pytest.raises(ValueError, match='gamma'):
    ssj.focal_sam(0.1, lam=1.0, gamma=-1.0, class_counts=COUNTS)
  with pytest.raises(TypeError, match='labels'):
    tx.update(params, tx.init(params), params, loss_fn=lambda p: per_example_loss(p, x, y))


def test_perturbed_aux_needs_a_static_stage():
  params = init_params(0)
  x, y = make_batch(0)
  tx = ssj.sse_sam(0.05, 0.1, 3)
  update = lambda state, aux: tx.update(
      params, state, params, loss_fn=lambda p: (per_example_loss(p, x, y), ()),
      group_ids=ssj.example_groups(y, TAIL), perturbed_aux=aux)
  with pytest.raises(ValueError, match='static stage'):  # traced: lax.switch on the count
    jax.jit(lambda state: update(state, [])).lower(tx.init(params))
  aux = []  # outside jit the count is known: the host picks stage 1 (head and tail)
  update(tx.init(params), aux)
  assert len(aux) == 2
