"""Models: parameter counts of the reference architectures, shapes, BatchNorm modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sse_sam_jax import models


@pytest.mark.parametrize('name,shape,classes,params', [
    ('conv1d', (4, 40), 10, 10_410),         # the offline benchmark's 1D CNN
    ('resnet32', (2, 32, 32, 3), 10, 464_154),  # LDAM-DRW's ResNet-32 (0.46M)
    ('resnet34_cifar', (2, 32, 32, 3), 100, 21_328_292),
    ('resnet50', (2, 64, 64, 3), 1000, 25_557_032),
])
def test_architectures(name, shape, classes, params):
  if params > 1e6:  # shapes only (the big ones take 15 s a test to initialise and compile)
    fm, p, bs = models.functional(nnx.eval_shape(
        lambda: models._REGISTRY[name](classes, rngs=nnx.Rngs(0))))  # pylint: disable=protected-access
  else:
    fm, p, bs = models.create(name, classes)
  assert models.count_params(p) == params
  logits, new_bs = jax.eval_shape(functools.partial(fm.apply, train=True), p, bs,
                                  jax.ShapeDtypeStruct(shape, jnp.float32))
  assert logits.shape == (shape[0], classes)
  assert jax.tree.structure(new_bs) == jax.tree.structure(bs)
  if params < 1e6:  # and a real forward pass
    logits = jax.jit(fm.apply, static_argnames='train')(p, bs, jnp.ones(shape), train=True)[0]
    assert logits.shape == (shape[0], classes) and bool(jnp.all(jnp.isfinite(logits)))


def test_batchnorm_train_uses_batch_stats_eval_uses_running():
  fm, p, bs = models.create('mlp', 3, in_features=5)
  x = jax.random.normal(jax.random.key(0), (16, 5)) * 3 + 2
  _, new_bs = fm.apply(p, bs, x, train=True)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_bs, bs)
  assert all(jax.tree.leaves(changed))
  logits_eval, same_bs = fm.apply(p, bs, x, train=False)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same_bs, bs)))
  # training mode: an example's logits depend on the rest of the batch
  l_full, _ = fm.apply(p, bs, x, train=True)
  l_half, _ = fm.apply(p, bs, x[:8], train=True)
  assert not np.allclose(l_full[:8], l_half)
  e_full, _ = fm.apply(p, bs, x, train=False)
  e_half, _ = fm.apply(p, bs, x[:8], train=False)
  np.testing.assert_allclose(e_full[:8], e_half, rtol=1e-6)


def test_normed_classifier_outputs_cosines():
  from sse_sam_jax.models.resnet import NormedLinear
  layer = NormedLinear(6, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 6))
  w = np.asarray(layer.kernel[...])
  want = np.asarray(x) @ w / np.linalg.norm(np.asarray(x), axis=1, keepdims=True) \
      / np.linalg.norm(w, axis=0, keepdims=True)
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(want)) > 0.3 and np.max(np.abs(want)) <= 1.0
  # inside the model: the logits are cosines, bounded by 1 and not all zero
  fm, p, bs = models.create('mlp', 4, in_features=6, normed_classifier=True)
  logits, _ = fm.apply(p, bs, x, train=False)
  assert float(jnp.max(jnp.abs(logits))) <= 1.0 + 1e-5 and float(jnp.std(logits)) > 1e-2


def test_unknown_model():
  with pytest.raises(ValueError, match='Unknown model'):
    models.create('vgg', 10)


def _leaves(params) -> dict:
  """``{('conv1', 'kernel'): array}``: the parameter leaves by their names."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
    out[names[:-1] if names[-1] == 'value' else names] = np.asarray(leaf)
  return out


@pytest.mark.parametrize('name,kw', [('conv1d', {}), ('mlp', {'in_features': 12})])
def test_torch_init_draws_every_kernel_and_bias_in_pytorch_bounds(name, kw):
  """PyTorch's default Conv/Linear init: kernel and bias uniform in +-1/sqrt(fan_in)."""
  leaves = _leaves(models.create(name, 10, seed=3, init='torch', **kw)[1])
  flax_leaves = _leaves(models.create(name, 10, seed=3, **kw)[1])
  checked = 0
  for path, value in leaves.items():
    if path[-1] not in ('kernel', 'bias') or (path[:-1] + ('kernel',)) not in leaves:
      continue
    kernel = leaves[path[:-1] + ('kernel',)]
    if kernel.ndim < 2:  # BatchNorm's scale/bias
      continue
    bound = int(np.prod(kernel.shape[:-1])) ** -0.5
    assert 0.5 * bound < np.abs(value).max() <= bound, (path, bound)
    checked += 1
  assert checked >= 4
  # the default keeps Flax's classifier: LeCun-normal kernel (3x the variance), zero bias
  assert not flax_leaves[('head', 'bias')].any()
  assert np.std(flax_leaves[('head', 'kernel')]) > 1.4 * np.std(leaves[('head', 'kernel')])


def test_unknown_init():
  with pytest.raises(ValueError, match='init must be one of'):
    models.create('conv1d', 10, init='kaiming')


def _loss(model_name, shape):
  fm, p, bs = models.create(model_name, 10, seed=0)
  x = jax.random.normal(jax.random.key(1), shape)
  y = jnp.arange(shape[0]) % 10

  def loss(p):
    logits, _ = fm.apply(p, bs, x, train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(shape[0]), y])
  return fm, p, loss


def resnet8(num_classes, *, rngs, **kw):
  """ResNet-8 (one block per stage): ResNet-32's layers at a test's cost."""
  from sse_sam_jax.models import resnet
  return resnet.CifarResNet(num_classes, 1, rngs=rngs, **kw)


@pytest.mark.parametrize('name,kwargs', [
    ('conv1d', {}), ('conv1d', {'init': 'torch'}), ('mlp', {'in_features': 7}),
    ('mlp', {'in_features': 7, 'init': 'torch', 'normed_classifier': True})])
def test_compiled_initialisation_gives_the_values_of_the_module_built_op_by_op(name, kwargs):
  """``create`` compiles the random draws as one program (at -O1, for XLA:CPU's compile
  time): every parameter and statistic has the bits of the module built op by op, so
  results and checkpoints do not depend on how the model was initialised. (At -O0 the
  truncated-normal kernels of ``mlp`` differ by an ulp. The ResNets, whose op-by-op build
  takes 13-20 s, were compared once by hand: identical.)"""
  fm, params, stats = models.create(name, 10, seed=3, **kwargs)
  module = models._REGISTRY[name](10, rngs=nnx.Rngs(3), **kwargs)  # pylint: disable=protected-access
  module.train()
  graphdef, params_eager, stats_eager = nnx.split(module, nnx.Param, nnx.BatchStat)
  assert graphdef == fm.train_graph
  assert jax.tree.structure(params) == jax.tree.structure(params_eager)
  for a, b in zip(jax.tree.leaves((params, stats)), jax.tree.leaves((params_eager, stats_eager))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name,shape', [('conv1d', (8, 40)), ('resnet8', (4, 16, 16, 3))])
def test_convolutions_between_barriers_leave_gradients_and_hessian_products_unchanged(
    monkeypatch, name, shape):
  """The convolutions' optimization barriers (for XLA:CPU's weight-gradient transposes)
  change no bit of the gradient, and forward-over-reverse (the Hessian analysis) runs
  through them."""
  from sse_sam_jax.models import resnet
  monkeypatch.setitem(models._REGISTRY, 'resnet8', resnet8)  # pylint: disable=protected-access
  _, p, loss = _loss(name, shape)
  grad_barrier = jax.jit(jax.grad(loss))(p)
  monkeypatch.setattr(resnet, 'conv_general_dilated', jax.lax.conv_general_dilated)
  _, p_plain, loss_plain = _loss(name, shape)
  grad_plain = jax.jit(jax.grad(loss_plain))(p_plain)
  for a, b in zip(jax.tree.leaves(grad_barrier), jax.tree.leaves(grad_plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if name != 'conv1d':
    return
  hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(p, grad_barrier)
  hvp_plain = jax.jit(lambda p, v: jax.jvp(jax.grad(loss_plain), (p,), (v,))[1])(
      p_plain, grad_plain)
  for a, b in zip(jax.tree.leaves(hvp), jax.tree.leaves(hvp_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
