"""Batch augmentations in NumPy (run in grain workers) and deterministic eval transforms.

CIFAR's pad-crop-flip also runs on the device (:func:`pad_crop_flip_on_device`): the host
draws the random choices (:func:`pad_crop_flip_draws`, the same draws in the same order)
and the device applies them to the training images it holds, with the same result.
"""

from __future__ import annotations

import numpy as np

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(x: np.ndarray, mean=CIFAR_MEAN, std=CIFAR_STD) -> np.ndarray:
  """uint8 NHWC -> float32, per-channel standardised."""
  return ((x.astype(np.float32) / 255.0) - mean) / std


def pad_crop_flip_draws(batch: int, rng: np.random.Generator, pad: int = 4
                        ) -> dict[str, np.ndarray]:
  """The random choices of :func:`pad_crop_flip` for ``batch`` images, drawn in its order:
  the crop's top row ``dy`` and left column ``dx`` in the padded image (int32, each in
  ``[0, 2 pad]``) and whether to flip (bool)."""
  dy = rng.integers(0, 2 * pad + 1, size=batch)
  dx = rng.integers(0, 2 * pad + 1, size=batch)
  flip = rng.random(batch) < 0.5
  return {'dy': dy.astype(np.int32), 'dx': dx.astype(np.int32), 'flip': flip}


def apply_pad_crop_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray,
                        pad: int = 4) -> np.ndarray:
  """``x`` (``[B, H, W, C]``) zero-padded by ``pad``, cropped back to ``H x W`` at
  ``(dy, dx)`` and flipped left-right where ``flip``: the draws of
  :func:`pad_crop_flip_draws` applied (on the device: :func:`pad_crop_flip_on_device`)."""
  b, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  out[flip] = out[flip, :, ::-1]
  return out


def pad_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation on a batch ``[B, H, W, C]``: zero-pad, random crop, random h-flip."""
  return apply_pad_crop_flip(x, **pad_crop_flip_draws(len(x), rng, pad), pad=pad)


def pad_crop_flip_on_device(images, ids, dy, dx, flip, pad: int = 4):
  """:func:`apply_pad_crop_flip` of ``images[ids]`` in JAX, inside a compiled program:
  the same values, bit for bit (a gather, a zero pad, slices and a select).

  ``images`` ``[N, H, W, C]`` (the training set on the device); ``ids``, ``dy``, ``dx``
  and ``flip`` of any one shape ``S`` (e.g. ``[B]``, or ``[n, B]`` for ``n`` steps);
  returns ``[*S, H, W, C]`` in the images' dtype.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the rest of this module is NumPy)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shape, (h, w, ch) = ids.shape, images.shape[1:]
  x = jnp.take(images, ids.reshape(-1), axis=0, mode='clip')
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = jax.vmap(lambda im, y, x0: jax.lax.dynamic_slice(im, (y, x0, jnp.zeros_like(y)),
                                                              (h, w, ch)))
  x = crop(x, dy.reshape(-1), dx.reshape(-1))
  x = jnp.where(flip.reshape(-1)[:, None, None, None], x[:, :, ::-1], x)
  return x.reshape(shape + (h, w, ch))


def random_resized_crop_flip(x: np.ndarray, rng: np.random.Generator, size: int = 224,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """ImageNet-style augmentation of one image ``[H, W, C]`` (nearest-neighbour resize)."""
  h, w = x.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
    if 0 < ch <= h and 0 < cw <= w:
      break
  else:
    ch, cw = min(h, w), min(h, w)
  y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  rows = y0 + (np.arange(size) * ch // size)
  cols = x0 + (np.arange(size) * cw // size)
  out = x[rows[:, None], cols[None, :]]
  return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop_resize(x: np.ndarray, size: int = 224, crop_fraction: float = 0.875):
  h, w = x.shape[:2]
  side = int(min(h, w) * crop_fraction)
  y0, x0 = (h - side) // 2, (w - side) // 2
  idx = np.arange(size) * side // size
  return x[y0 + idx[:, None], x0 + idx[None, :]]


def hflip(x: np.ndarray) -> np.ndarray:
  """Horizontal flip of a batch (images ``[B, H, W, C]`` or sequences ``[B, L]``)."""
  return x[:, :, ::-1] if x.ndim == 4 else x[:, ::-1]
