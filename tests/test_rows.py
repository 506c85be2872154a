"""Image sets read by rows (dbjax.data.rows): a folder, .npy arrays and tfds read only the
rows a batch needs, and every batch equals the one the whole set held in RAM gives,
bit for bit."""
import os

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dbjax import data, train
from dbjax.data import own, rows as rows_lib
from dbjax.errors import DataError
from tests.conftest import tiny_config
from tests.test_own_data import write_folder

BATCHES = [np.array([0, 5, 5, 2]), np.array([17, 3]), np.arange(24)]


def as_decoded_before(root, split):
  """A folder's split as dbjax read it before rows: every file decoded, stacked, then
  scaled (the formula of that code), in the order the split lists them."""
  loaded = data.load_images(f"folder:{root}", split, cache_bytes=0)
  pixels = np.stack([np.asarray(Image.open(p).convert("L"))[..., None]
                     for p in loaded.images.paths])
  return pixels.astype(np.float32) / 127.5 - 1.0, loaded


def test_a_folder_read_by_rows_equals_it_held_in_ram(tmp_path, capsys):
  root = write_folder(tmp_path / "pngs", per_class=10)
  before, by_rows = as_decoded_before(root, "train")
  in_ram = data.load_images(f"folder:{root}", "train")
  assert isinstance(by_rows.images, rows_lib.FileRows) and isinstance(in_ram.images, np.ndarray)
  out = capsys.readouterr().out
  assert "24 images (0 MiB as float32) read by rows" in out and "held in RAM" in out
  np.testing.assert_array_equal(in_ram.images, before)
  for index in BATCHES:
    for a, b in zip(by_rows.batch(index), in_ram.batch(index)):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(by_rows.images[3:9], before[3:9])
  np.testing.assert_array_equal(np.asarray(by_rows.images), before)
  assert by_rows.images.shape == (24, 8, 8, 1) and by_rows.images.dtype == np.float32


def test_a_batch_decodes_only_its_own_files(tmp_path, monkeypatch):
  root = write_folder(tmp_path / "pngs", per_class=10)
  loaded = data.load_images(f"folder:{root}", "train", cache_bytes=0)
  opened = []
  real_decode = own.decode
  monkeypatch.setattr(own, "decode", lambda path, *a: opened.append(path) or real_decode(path, *a))
  loaded.batch(np.array([4, 1, 4]))
  assert opened == [loaded.images.paths[i] for i in (4, 1, 4)]


def write_npy_folder(directory, pixels, labels, split=False):
  os.makedirs(directory, exist_ok=True)
  if split:
    np.save(directory / "train_images.npy", pixels[:16])
    np.save(directory / "train_labels.npy", labels[:16])
    np.save(directory / "test_images.npy", pixels[16:])
    np.save(directory / "test_labels.npy", labels[16:])
  else:
    np.save(directory / "images.npy", pixels)
    np.save(directory / "labels.npy", labels)
  np.save(directory / "class_names.npy", np.array(["a", "b", "c", "d"]))
  return directory


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npy_arrays_read_by_rows_equal_the_same_arrays_in_a_npz(tmp_path, dtype):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
  if dtype == "float32":
    pixels = (pixels / 127.5 - 1).astype(np.float32)
  labels = np.arange(20) % 4
  np.savez(tmp_path / "set.npz", images=pixels, labels=labels)
  write_npy_folder(tmp_path / "npy", pixels, labels)
  for split in ("train", "test"):
    npz = data.load_images(f"arrays:{tmp_path / 'set.npz'}", split)
    npy = data.load_images(f"arrays:{tmp_path / 'npy'}", split, cache_bytes=0)
    assert isinstance(npy.images, rows_lib.RowSource)
    assert npy.class_names == ("a", "b", "c", "d") and npy.num_classes == 4
    np.testing.assert_array_equal(npy.labels, npz.labels)
    np.testing.assert_array_equal(np.asarray(npy.images), npz.images)
    index = np.array([2, 0, 2])
    np.testing.assert_array_equal(npy.batch(index)[0], npz.batch(index)[0])
  made = data.load_images(f"arrays:{write_npy_folder(tmp_path / 'made', pixels, labels, True)}",
                          "test", cache_bytes=0)
  np.testing.assert_array_equal(np.asarray(made.images), np.asarray(
      data.load_images(f"arrays:{tmp_path / 'made'}", "test").images))
  assert len(made.images) == 4


def test_bad_npy_arrays_are_one_line(tmp_path):
  pixels = np.zeros((20, 8, 8, 1), np.float32)
  pixels[3] = 2.0
  write_npy_folder(tmp_path / "npy", pixels, np.arange(20) % 4)
  loaded = data.load_images(f"arrays:{tmp_path / 'npy'}", "train", cache_bytes=0)
  row = int(np.flatnonzero(loaded.images.index == 3)[0])
  with pytest.raises(DataError, match=r"images.npy: row 3 spans \[2, 2\]; expected images in"):
    loaded.batch(np.array([row]))
  os.remove(tmp_path / "npy" / "labels.npy")
  with pytest.raises(DataError, match=r"npy: holds .*; expected train_images.npy"):
    data.load_images(f"arrays:{tmp_path / 'npy'}", "train")
  np.save(tmp_path / "npy" / "labels.npy", np.zeros(19, int))
  with pytest.raises(DataError, match=r"labels of shape \(19,\); expected \(20,\)"):
    data.load_images(f"arrays:{tmp_path / 'npy'}", "train")


def test_tfds_read_by_rows_equals_it_held_in_ram():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    in_ram = data.load_images("tfds:cifar10", "train")
    by_rows = data.load_images("tfds:cifar10", "train", cache_bytes=0)
    assert isinstance(by_rows.images, rows_lib.TfdsRows)
    np.testing.assert_array_equal(by_rows.labels, in_ram.labels)
    for index in (np.array([3, 0, 11, 3]), np.arange(12)):
      np.testing.assert_array_equal(by_rows.batch(index)[0], in_ram.batch(index)[0])


@pytest.mark.slow  # three trainings, 22 s; the default set checks the batches are equal
def test_a_run_from_rows_equals_a_run_from_ram(tmp_path):
  """Training reads a folder by rows (cache_bytes 0) to the same parameters, bit for
  bit, as from the set decoded into RAM, and as with no batch read ahead: each step's
  batch is the same."""
  root = write_folder(tmp_path / "pngs", per_class=12)
  config = tiny_config(train__num_steps=4, train__checkpoint_every=4)
  config.data.name = f"folder:{root}"
  runs = []
  for cache_bytes, prefetch in ((config.data.cache_bytes, 2), (0, 2), (0, 0)):
    config.data.update(cache_bytes=cache_bytes, prefetch=prefetch)
    runs.append(train.train(config, str(tmp_path / f"run_{cache_bytes}_{prefetch}")))
  chex.assert_trees_all_equal(runs[0].states, runs[1].states)
  chex.assert_trees_all_equal(runs[0].states, runs[2].states)
