"""ResNets in Flax NNX: CIFAR ResNet-32, ResNet-34 with a CIFAR stem, ResNet-50.

BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. Flax ``momentum=0.9``,
eps 1e-5, biased batch variance in training mode). Inputs are NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sse_sam_jax.models.masking import MaskedBatchNorm

# PyTorch's kaiming_normal_ (fan_in, gain sqrt(2), untruncated normal).
KAIMING_NORMAL = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """PyTorch's defaults; statistics over the real examples of a padded batch
  (:class:`~sse_sam_jax.models.masking.MaskedBatchNorm`)."""
  return MaskedBatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def conv_general_dilated(lhs, rhs, *args, **kwargs):
  """``lax.conv_general_dilated``; on XLA:CPU between two optimization barriers.

  The weight gradient of a convolution is a convolution over the batch, for which
  XLA:CPU transposes the layer's input and the output's cotangent. Left to itself
  it fuses the elementwise work that produced them (BatchNorm, ReLU, the residual
  adds, recomputed) into those transposes, whose strided reads then cost ~55% of a
  ResNet-32 step (a single transpose fusion took 150 ms). With the input and the
  output materialised (``lax.optimization_barrier``; its transpose puts the
  cotangent behind one too) the transposes are plain copies: a plain ResNet-32 b128
  SGD step on 2 cores went from 2437 to 1874 ms with XLA's default options, gradients
  bit-identical (``benchmarks/cpu_convolutions.py``; with ``cpu_convolutions='eigen'``
  the trainer's step took 1092 ms). Other backends run the plain convolution.
  """
  if jax.default_backend() != 'cpu':
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  out = lax.conv_general_dilated(lax.optimization_barrier(lhs), rhs, *args, **kwargs)
  return lax.optimization_barrier(out)


def conv(in_f: int, out_f: int, kernel: int, stride: int, rngs: nnx.Rngs, *,
         use_bias: bool = False, ndim: int = 2, **init) -> nnx.Conv:
  pad = kernel // 2
  init = init or dict(kernel_init=KAIMING_NORMAL)
  return nnx.Conv(in_f, out_f, (kernel,) * ndim, (stride,) * ndim,
                  padding=((pad, pad),) * ndim, use_bias=use_bias,
                  conv_general_dilated=conv_general_dilated, rngs=rngs, **init)


class NormedLinear(nnx.Module):
  """Cosine classifier of LDAM: ``normalize(x) @ normalize(W, axis=0)``."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (in_features, out_features), minval=-1.0, maxval=1.0))

  def __call__(self, x):
    w = self.kernel[...]
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
    w = w / (jnp.linalg.norm(w, axis=0, keepdims=True) + 1e-12)
    return x @ w


def classifier(in_features: int, num_classes: int, normed: bool, rngs: nnx.Rngs):
  if normed:
    return NormedLinear(in_features, num_classes, rngs=rngs)
  return nnx.Linear(in_features, num_classes, rngs=rngs)


def projection(in_f: int, out_f: int, stride: int, rngs: nnx.Rngs, needed: bool):
  """A residual block's projection shortcut, 1x1 conv + BN, or ``(None, None)``."""
  if not needed:
    return None, None
  return conv(in_f, out_f, 1, stride, rngs), batch_norm(out_f, rngs)


class BasicBlock(nnx.Module):
  """3x3-3x3 residual block. ``shortcut='A'``: parameter-free subsample + zero-pad
  (He et al. 2016, CIFAR; LDAM-DRW's ResNet-32); ``'B'``: 1x1 conv + BN."""

  def __init__(self, in_f: int, out_f: int, stride: int, shortcut: str, *, rngs: nnx.Rngs):
    self.conv1 = conv(in_f, out_f, 3, stride, rngs)
    self.bn1 = batch_norm(out_f, rngs)
    self.conv2 = conv(out_f, out_f, 3, 1, rngs)
    self.bn2 = batch_norm(out_f, rngs)
    self.stride, self.pad = stride, out_f - in_f
    self.shortcut_kind = shortcut
    needs_projection = stride != 1 or in_f != out_f
    self.proj_conv, self.proj_bn = projection(in_f, out_f, stride, rngs,
                                              shortcut == 'B' and needs_projection)

  def _shortcut(self, x):
    if self.proj_conv is not None:
      return self.proj_bn(self.proj_conv(x))
    if self.stride != 1 or self.pad:
      x = x[:, ::self.stride, ::self.stride, :]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
    return x

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + self._shortcut(x))


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_f: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    out_f = planes * self.expansion
    self.conv1 = conv(in_f, planes, 1, 1, rngs)
    self.bn1 = batch_norm(planes, rngs)
    self.conv2 = conv(planes, planes, 3, stride, rngs)
    self.bn2 = batch_norm(planes, rngs)
    self.conv3 = conv(planes, out_f, 1, 1, rngs)
    self.bn3 = batch_norm(out_f, rngs)
    self.proj_conv, self.proj_bn = projection(in_f, out_f, stride, rngs,
                                              stride != 1 or in_f != out_f)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    s = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
    return nnx.relu(y + s)


class CifarResNet(nnx.Module):
  """ResNet-(6n+2) for 32x32 inputs: 3 stages of ``n`` basic blocks, 16/32/64 channels."""

  def __init__(self, num_classes: int, blocks_per_stage: int = 5, *, in_channels: int = 3,
               normed_classifier: bool = False, rngs: nnx.Rngs):
    self.stem = conv(in_channels, 16, 3, 1, rngs)
    self.stem_bn = batch_norm(16, rngs)
    blocks, in_f = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(blocks_per_stage):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(BasicBlock(in_f, width, stride, 'A', rngs=rngs))
        in_f = width
    self.blocks = nnx.List(blocks)
    self.head = classifier(64, num_classes, normed_classifier, rngs)

  def features(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x):
    return self.head(self.features(x))


class ResNet(nnx.Module):
  """ImageNet-style ResNet; ``cifar_stem=True`` swaps the 7x7/2 conv + max-pool for a
  3x3/1 conv (the SSE-SAM reference backbone: ResNet-34 with a CIFAR stem)."""

  def __init__(self, num_classes: int, stage_sizes: Sequence[int], bottleneck: bool, *,
               cifar_stem: bool = False, in_channels: int = 3, normed_classifier: bool = False,
               rngs: nnx.Rngs):
    self.cifar_stem = cifar_stem
    self.stem = conv(in_channels, 64, 3 if cifar_stem else 7, 1 if cifar_stem else 2, rngs)
    self.stem_bn = batch_norm(64, rngs)
    blocks, in_f = [], 64
    for stage, n in enumerate(stage_sizes):
      planes = 64 * 2 ** stage
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        if bottleneck:
          blocks.append(Bottleneck(in_f, planes, stride, rngs=rngs))
          in_f = planes * Bottleneck.expansion
        else:
          blocks.append(BasicBlock(in_f, planes, stride, 'B', rngs=rngs))
          in_f = planes
    self.blocks = nnx.List(blocks)
    self.head = classifier(in_f, num_classes, normed_classifier, rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    if not self.cifar_stem:
      x = nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def resnet32(num_classes: int, *, rngs: nnx.Rngs, **kw) -> CifarResNet:
  return CifarResNet(num_classes, 5, rngs=rngs, **kw)


def resnet34_cifar(num_classes: int, *, rngs: nnx.Rngs, **kw) -> ResNet:
  return ResNet(num_classes, (3, 4, 6, 3), bottleneck=False, cifar_stem=True, rngs=rngs, **kw)


def resnet50(num_classes: int, *, rngs: nnx.Rngs, **kw) -> ResNet:
  return ResNet(num_classes, (3, 4, 6, 3), bottleneck=True, rngs=rngs, **kw)
