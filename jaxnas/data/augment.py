"""Standard CIFAR augmentation as pure, jittable JAX functions on NHWC float images in [0, 1].

The DARTS training pipeline (quark0/darts ``utils._data_transforms_cifar10``) is random crop with 4 pixels of
zero padding, horizontal flip with probability 1/2, normalisation, then cutout (DeVries & Taylor 2017). Since
jaxnas normalises inside the model, augmentation runs on [0, 1] pixels; DARTS' cutout zeroes *normalised*
pixels, which in pixel space is the dataset mean, so pass ``cutout_fill=mean`` to reproduce it exactly
(``make_augment`` does).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def to_float(images) -> jax.Array:
  """uint8 images in [0, 255] -> float32 in [0, 1]."""
  return jnp.asarray(images, jnp.float32) / 255.0


def random_crop(rng, images: jax.Array, padding: int) -> jax.Array:
  """Pads each image with ``padding`` zeros on every side and crops back to its size at a uniform offset."""
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(rng, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_cutout(rng, images: jax.Array, length: int, fill=0.0) -> jax.Array:
  """Cutout with the DARTS semantics: a centre (y, x) uniform over the image, the square
  ``[y - length//2, y + length//2) x [x - length//2, x + length//2)`` clipped at the borders set to ``fill``
  (a scalar or one value per channel)."""
  b, h, w, _ = images.shape
  ry, rx = jax.random.split(rng)
  y = jax.random.randint(ry, (b, 1), 0, h)
  x = jax.random.randint(rx, (b, 1), 0, w)
  rows, cols = jnp.arange(h)[None], jnp.arange(w)[None]
  in_rows = (rows >= y - length // 2) & (rows < y + length // 2)
  in_cols = (cols >= x - length // 2) & (cols < x + length // 2)
  square = in_rows[:, :, None, None] & in_cols[:, None, :, None]
  return jnp.where(square, jnp.asarray(fill, images.dtype), images)


def augment(rng, images: jax.Array, *, crop_padding: int = 0, flip: bool = False, cutout: int = 0,
            cutout_fill=0.0) -> jax.Array:
  """Random crop (if ``crop_padding``), flip (if ``flip``), then cutout of length ``cutout`` (if nonzero)."""
  crop_rng, flip_rng, cutout_rng = jax.random.split(rng, 3)
  if crop_padding:
    images = random_crop(crop_rng, images, crop_padding)
  if flip:
    images = random_flip(flip_rng, images)
  if cutout:
    images = random_cutout(cutout_rng, images, cutout, cutout_fill)
  return images


def make_augment(config, mean: Sequence[float]) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``(rng, images) -> images`` with the data config's ``crop_padding``, ``flip`` and ``cutout``.

  Cutout fills with the dataset ``mean`` (DARTS' zero after normalisation).
  """
  return functools.partial(augment, crop_padding=int(config.crop_padding), flip=bool(config.flip),
                           cutout=int(config.cutout), cutout_fill=tuple(mean))
