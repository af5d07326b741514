"""Small networks for the offline benchmark (MNIST-1D) and for tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sse_sam_jax.models.resnet import batch_norm, classifier, conv

INITS = ('flax', 'torch')


def _torch_init(fan_in: int) -> dict:
  """PyTorch's default ``Conv``/``Linear`` init: kernel (kaiming_uniform with a=sqrt(5))
  and bias both uniform in +-1/sqrt(fan_in)."""
  bound = fan_in ** -0.5
  return dict(kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'),
              bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                  key, shape, dtype, -bound, bound))


def _layer_init(init: str, fan_in: int) -> dict:
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}.')
  return _torch_init(fan_in) if init == 'torch' else {}


def _classifier(in_features: int, num_classes: int, normed: bool, init: str, rngs: nnx.Rngs):
  if normed or init == 'flax':
    return classifier(in_features, num_classes, normed, rngs)
  return nnx.Linear(in_features, num_classes, rngs=rngs, **_layer_init(init, in_features))


class Conv1DNet(nnx.Module):
  """The offline benchmark's 1D CNN (10,410 parameters for 10 classes).

  Conv1d(1,32,k5,p2)-BN-ReLU, Conv1d(32,32,k3,p1,s2)-BN-ReLU,
  Conv1d(32,64,k3,p1,s2)-BN-ReLU, global average pool, Dense(64, C). Input ``[B, L]``
  or ``[B, L, 1]``.

  ``init='flax'`` (the default, as trained so far): convolution kernels as PyTorch's
  default, the classifier kernel LeCun-normal (3x the variance of PyTorch's) and every
  bias zero. ``init='torch'``: every kernel and bias as PyTorch's default Conv1d/Linear
  (uniform in +-1/sqrt(fan_in)), the reference code's initialisation. The convolution
  biases feed BatchNorm, which removes them; the classifier's are the ones that matter.
  """

  def __init__(self, num_classes: int, *, in_channels: int = 1,
               normed_classifier: bool = False, init: str = 'flax', rngs: nnx.Rngs):
    torch_kernel = _torch_init(1)['kernel_init']

    def layer(i, o, k, s):
      kw = _layer_init(init, i * k) if init == 'torch' else dict(kernel_init=torch_kernel)
      return conv(i, o, k, s, rngs, use_bias=True, ndim=1, **kw)

    self.conv1, self.bn1 = layer(in_channels, 32, 5, 1), batch_norm(32, rngs)
    self.conv2, self.bn2 = layer(32, 32, 3, 2), batch_norm(32, rngs)
    self.conv3, self.bn3 = layer(32, 64, 3, 2), batch_norm(64, rngs)
    self.head = _classifier(64, num_classes, normed_classifier, init, rngs)

  def __call__(self, x):
    if x.ndim == 2:
      x = x[..., None]
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.bn3(self.conv3(x)))
    return self.head(jnp.mean(x, axis=1))


class MLP(nnx.Module):
  """Dense-BN-ReLU layers and a linear classifier, for feature inputs ``[B, D]``;
  ``init`` as :class:`Conv1DNet`'s ('flax': Flax's defaults everywhere)."""

  def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,), *,
               normed_classifier: bool = False, init: str = 'flax', rngs: nnx.Rngs):
    layers, norms, d = [], [], in_features
    for h in hidden:
      layers.append(nnx.Linear(d, h, rngs=rngs, **_layer_init(init, d)))
      norms.append(batch_norm(h, rngs))
      d = h
    self.layers, self.norms = nnx.List(layers), nnx.List(norms)
    self.head = _classifier(d, num_classes, normed_classifier, init, rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer, norm in zip(self.layers, self.norms):
      x = nnx.relu(norm(layer(x)))
    return self.head(x)
