"""Batch augmentations in NumPy (run in grain workers) and deterministic eval transforms."""

from __future__ import annotations

import numpy as np

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(x: np.ndarray, mean=CIFAR_MEAN, std=CIFAR_STD) -> np.ndarray:
  """uint8 NHWC -> float32, per-channel standardised."""
  return ((x.astype(np.float32) / 255.0) - mean) / std


def pad_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation on a batch ``[B, H, W, C]``: zero-pad, random crop, random h-flip."""
  b, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=b)
  dx = rng.integers(0, 2 * pad + 1, size=b)
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(b) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


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
