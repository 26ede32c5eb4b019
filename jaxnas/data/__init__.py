"""The data layer: sources, the search split, resumable batching and augmentation.

Typical use by a search loop::

  dataset = data.load(config.data)                       # uint8 NHWC arrays + mean/std for the model
  train, val = data.search_split(dataset, config.data.val_fraction, seed)
  aug = jax.jit(data.make_augment(config.data, dataset.mean))
  for batch in data.epoch_batches(*train, batch_size, seed, epoch, start_step=k):
    x = aug(rng, data.to_float(batch.images))            # float32 [0, 1]
"""
from jaxnas.data.augment import augment, make_augment, random_crop, random_cutout, random_flip, to_float
from jaxnas.data.batching import batch_indices, epoch_batches, epoch_order, num_batches, search_split
from jaxnas.data.sources import Dataset, Split, channel_stats, default_config, load, read_npz

__all__ = [
    'Dataset', 'Split', 'augment', 'batch_indices', 'channel_stats', 'default_config', 'epoch_batches',
    'epoch_order', 'load', 'make_augment', 'num_batches', 'random_crop', 'random_cutout', 'random_flip',
    'read_npz', 'search_split', 'to_float',
]
