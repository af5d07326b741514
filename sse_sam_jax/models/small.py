"""Small networks for the offline benchmark (MNIST-1D) and for tests."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sse_sam_jax.models.resnet import batch_norm, classifier


class Conv1DNet(nnx.Module):
  """The offline benchmark's 1D CNN (10,410 parameters for 10 classes).

  Conv1d(1,32,k5,p2)-BN-ReLU, Conv1d(32,32,k3,p1,s2)-BN-ReLU,
  Conv1d(32,64,k3,p1,s2)-BN-ReLU, global average pool, Dense(64, C). Input ``[B, L]``
  or ``[B, L, 1]``.
  """

  def __init__(self, num_classes: int, *, in_channels: int = 1,
               normed_classifier: bool = False, rngs: nnx.Rngs):
    # PyTorch's default Conv1d/Linear init (kaiming_uniform with a=sqrt(5)).
    init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
    layer = lambda i, o, k, s: nnx.Conv(i, o, (k,), (s,), padding=((k // 2, k // 2),),
                                        kernel_init=init, rngs=rngs)
    self.conv1, self.bn1 = layer(in_channels, 32, 5, 1), batch_norm(32, rngs)
    self.conv2, self.bn2 = layer(32, 32, 3, 2), batch_norm(32, rngs)
    self.conv3, self.bn3 = layer(32, 64, 3, 2), batch_norm(64, rngs)
    self.head = classifier(64, num_classes, normed_classifier, rngs)

  def __call__(self, x):
    if x.ndim == 2:
      x = x[..., None]
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.bn3(self.conv3(x)))
    return self.head(jnp.mean(x, axis=1))


class MLP(nnx.Module):
  """Dense-BN-ReLU layers and a linear classifier, for feature inputs ``[B, D]``."""

  def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,), *,
               normed_classifier: bool = False, rngs: nnx.Rngs):
    layers, norms, d = [], [], in_features
    for h in hidden:
      layers.append(nnx.Linear(d, h, rngs=rngs))
      norms.append(batch_norm(h, rngs))
      d = h
    self.layers, self.norms = nnx.List(layers), nnx.List(norms)
    self.head = classifier(d, num_classes, normed_classifier, rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer, norm in zip(self.layers, self.norms):
      x = nnx.relu(norm(layer(x)))
    return self.head(x)
