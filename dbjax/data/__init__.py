"""Data sets as in-memory arrays with a step-indexed batch order.

  dbjax.data.images   images: digits, Fashion-MNIST IDX files, tfds by name
  dbjax.data.text     characters: Shakespeare's plays, any UTF-8 file, tfds by name
  dbjax.data.batches  the examples of iteration `step`, a pure function of (seed, step)
  dbjax.data.tfds_source  a tfds data set by name, with one quick error when offline

Each data set has .num_examples and .batch(index) -> the task's batch tuple.
"""
from dbjax.data.batches import batch_indices
from dbjax.data.images import ImageData, check_images, load_images, read_idx
from dbjax.data.text import TextData, Vocabulary, load_text

__all__ = ["batch_indices", "ImageData", "check_images", "load_images", "read_idx",
           "TextData", "Vocabulary", "load_text"]
