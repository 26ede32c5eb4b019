"""Augmentation against numpy references: crop = translation of the zero-padded image, flip, DARTS cutout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import data


def _images(b, h=6, w=6, c=2, seed=0):
  # Distinct values in (0.1, 1] so that every crop offset, flip and cutout square is identifiable.
  return np.random.default_rng(seed).uniform(0.1, 1.0, (b, h, w, c)).astype(np.float32)


def test_to_float():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  y = data.to_float(x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) / 255.0, rtol=2e-7)


def test_random_crop_is_a_translation_of_the_padded_image():
  images, padding = _images(300), 2
  out = np.asarray(data.random_crop(jax.random.key(0), jnp.asarray(images), padding))
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h, w = images.shape[1:3]
  offsets = []
  for i in range(len(images)):
    matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
               if np.array_equal(padded[i, dy:dy + h, dx:dx + w], out[i])]
    assert len(matches) == 1, f'sample {i} is not a crop of its padded image'
    offsets.append(matches[0])
  assert set(offsets) == {(dy, dx) for dy in range(5) for dx in range(5)}  # every offset occurs.


def test_random_flip():
  images = _images(200)
  out = np.asarray(data.random_flip(jax.random.key(1), jnp.asarray(images)))
  same = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)
  assert 0.35 < mirrored.mean() < 0.65


def _darts_cutout_masks(h, w, length):
  """All masks of quark0/darts' Cutout: centre (y, x) uniform, square clipped to the image, by centre."""
  masks = {}
  for y in range(h):
    for x in range(w):
      mask = np.zeros((h, w), bool)
      y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
      x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
      mask[y1:y2, x1:x2] = True
      masks[(y, x)] = mask
  return masks


@pytest.mark.parametrize('length', [4, 5])
def test_random_cutout_matches_darts(length):
  images = _images(1000, h=8, w=8)
  out = np.asarray(data.random_cutout(jax.random.key(2), jnp.asarray(images), length))
  changed = out != images
  assert np.all(changed == changed[..., :1])  # all channels of a pixel together.
  assert np.all(out[changed] == 0.0)
  reference = _darts_cutout_masks(8, 8, length)
  centres = list(reference)
  stack = np.stack([reference[c] for c in centres])
  hits = np.all(changed[:, None, :, :, 0] == stack[None], axis=(2, 3))
  assert np.all(hits.sum(1) == 1), 'a cutout mask is not one of the DARTS squares'
  assert set(np.argmax(hits, 1)) == set(range(len(centres)))  # every centre occurs, borders included.


def test_cutout_fill_per_channel():
  images = _images(20)
  out = np.asarray(data.random_cutout(jax.random.key(3), jnp.asarray(images), 4, fill=(0.25, 0.75)))
  changed = np.any(out != images, axis=-1)
  assert changed.any()
  np.testing.assert_array_equal(out[changed], np.broadcast_to([0.25, 0.75], out[changed].shape))


def test_augment_order_determinism_and_jit():
  images = jnp.asarray(_images(16))
  rng = jax.random.key(4)
  aug = jax.jit(functools.partial(data.augment, crop_padding=2, flip=True, cutout=3))
  out = aug(rng, images)

  @jax.jit
  def manual(rng, images):  # crop, then flip, then cutout (the DARTS order).
    crop_rng, flip_rng, cutout_rng = jax.random.split(rng, 3)
    images = data.random_flip(flip_rng, data.random_crop(crop_rng, images, 2))
    return data.random_cutout(cutout_rng, images, 3)

  np.testing.assert_array_equal(manual(rng, images), out)
  np.testing.assert_array_equal(aug(rng, images), out)
  assert not np.array_equal(aug(jax.random.key(5), images), out)
  np.testing.assert_array_equal(data.augment(rng, images), images)  # everything off: identity.


def test_make_augment_uses_config_and_mean():
  config = data.default_config()
  config.cutout = 4
  aug = data.make_augment(config, mean=(0.3, 0.6))
  images = jnp.asarray(_images(10))
  out = np.asarray(aug(jax.random.key(6), images))
  changed = np.any(out != np.asarray(images), axis=-1)
  assert changed.any()
  np.testing.assert_allclose(out[changed], np.broadcast_to([0.3, 0.6], out[changed].shape))
