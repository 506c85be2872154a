"""Data loading (digits, Fashion-MNIST IDX, tfds by name) and input validation."""
import gzip
import io
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dbjax import data
from dbjax.data import images as image_data, tfds_source
from dbjax.errors import DataError


def test_digits_split_shapes_and_range():
  train, test = data.load_images("digits", "train"), data.load_images("digits", "test")
  assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
  assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
  assert train.images.min() == -1.0 and train.images.max() == 1.0
  assert set(np.unique(train.labels)) == set(range(10))


def write_idx(path, array):
  header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 28, 28))
  labels = np.array([0, 3, 9, 1, 2])
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
  loaded = data.load_images("fashion_mnist", "test", str(tmp_path))
  np.testing.assert_allclose(loaded.images[..., 0], images / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(loaded.labels, labels)


def test_truncated_idx_file_is_reported(tmp_path):
  path = tmp_path / "bad.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
  with pytest.raises(DataError, match="header says"):
    data.read_idx(str(path))


def test_missing_fashion_mnist_names_the_package(tmp_path):
  with pytest.raises(DataError, match="dataset-fashion-mnist"):
    data.load_images("fashion_mnist", "train", str(tmp_path))


@pytest.mark.skipif(not __import__("os").path.exists(image_data.FASHION_MNIST_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
  test = data.load_images("fashion_mnist", "test")
  assert test.images.shape == (10000, 28, 28, 1) and test.num_classes == 10


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_by_name_with_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    loaded = data.load_images(f"tfds:{name}", "train")
  assert loaded.images.shape == (12,) + shape and loaded.num_classes == 10
  assert -1.0 <= loaded.images.min() and loaded.images.max() <= 1.0


class DbjaxTestPngs(tfds.core.GeneratorBasedBuilder):
  """A tfds set prepared here as users' are (array_record, PNG-encoded images), with no
  TensorFlow: tfds encodes an image given as PNG bytes without it."""
  VERSION = tfds.core.Version("1.0.0")
  PIXELS = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), np.uint8)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(8)),
            "test": self._generate_examples(range(8, 12))}

  def _generate_examples(self, rows):  # pylint: disable=arguments-differ
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for i in rows:
      png = io.BytesIO()
      Image.fromarray(self.PIXELS[i]).save(png, "PNG")
      png.seek(0)
      yield i, {"image": png, "label": i % 3}


def test_a_prepared_tfds_set_decodes_only_the_rows_read(tmp_path, monkeypatch):
  """Loading reads every label without decoding an image (ImageNet's 1.28 M JPEGs would
  take hours at each start); a batch decodes its own rows."""
  DbjaxTestPngs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  decoded = []
  decode = tfds.features.Image.decode_example_np
  monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                      lambda self, example: decoded.append(1) or decode(self, example))
  train = data.load_images("tfds:dbjax_test_pngs", "train", str(tmp_path), cache_bytes=0)
  assert len(decoded) == 1  # the first row, for the images' shape
  batch = train.images[[5, 2, 7]]
  assert len(decoded) == 4
  # tfds stores the examples in an order of its own: find each row's example by its pixels.
  pixels = np.round((np.asarray(train.images) + 1) * 127.5).astype(np.uint8)
  example = [next(i for i in range(8) if (DbjaxTestPngs.PIXELS[i] == row).all()) for row in pixels]
  assert sorted(example) == list(range(8))
  np.testing.assert_array_equal(train.labels, np.asarray(example) % 3)
  np.testing.assert_array_equal(batch, np.asarray(train.images)[[5, 2, 7]])
  assert train.num_classes == 3


def test_unknown_tfds_name_is_one_clear_error():
  with pytest.raises(DataError, match="no_such_dataset"):
    data.load_images("tfds:no_such_dataset", "train")
  with pytest.raises(DataError, match=r"tfds has no data set 'mnsit' \(did you mean 'mnist'"):
    data.load_images("tfds:mnsit", "train")


@pytest.mark.parametrize("load", [lambda d: data.load_images("tfds:mnist", "train", d),
                                  lambda d: data.load_text("tfds:tiny_shakespeare", 16, d)])
def test_a_tfds_set_not_on_disk_without_a_network_is_one_quick_error(load, tmp_path,
                                                                      monkeypatch):
  """Offline, tfds's downloader retried for minutes (205 s measured here) and left
  partial folders; the network is probed first instead."""
  monkeypatch.setattr(tfds_source, "network_unreachable", lambda: "Name or service not known")
  start = time.perf_counter()
  with pytest.raises(DataError, match=r"is not in .* and storage.googleapis.com cannot be "
                                      r"reached \(Name or service not known\): prepare it"):
    load(str(tmp_path / "tfds"))
  assert time.perf_counter() - start < 10
  assert not os.path.exists(tmp_path / "tfds")  # nothing half-downloaded left behind


def test_the_network_probe_answers_within_its_limit():
  start = time.perf_counter()
  reason = tfds_source.network_unreachable(seconds=2.0)
  assert time.perf_counter() - start < 3.0
  assert reason is None or isinstance(reason, str)
  # A port nothing listens on: refused at once, in words.
  assert tfds_source.network_unreachable("127.0.0.1", 9, seconds=2.0)


def test_unknown_data_set_name():
  with pytest.raises(DataError, match="config.data.name"):
    data.load_images("imagenet", "train")


GOOD = (np.zeros((4, 8, 8, 1), np.float32), np.arange(4, dtype=np.int32))


@pytest.mark.parametrize("images,labels,message", [
    (np.zeros((4, 8, 8), np.float32), GOOD[1], "shape"),
    (np.zeros((4, 28, 28, 1), np.float32), GOOD[1], "expected \\(N, 8, 8, 1\\)"),
    (np.zeros((4, 8, 8, 1), np.uint8), GOOD[1], "dtype uint8"),
    (np.full((4, 8, 8, 1), np.nan, np.float32), GOOD[1], "NaN"),
    (GOOD[0], np.array([0, 1, 2, 10]), "labels span \\[0, 10\\]"),
    (GOOD[0], np.array([0, -1, 2, 3]), "labels span"),
    (GOOD[0], np.array([0.0, 1.0, 2.0, 3.0]), "labels have dtype float"),
    (GOOD[0], np.arange(3), "labels have shape"),
])
def test_bad_inputs_are_named(images, labels, message):
  with pytest.raises(DataError, match=message):
    data.check_images(images, labels, 8, 1, 10)


def test_good_inputs_pass():
  data.check_images(*GOOD, 8, 1, 10)


def test_batches_are_a_pure_function_of_seed_and_step():
  a = data.batch_indices(0, 7, 100, 16)
  np.testing.assert_array_equal(a, data.batch_indices(0, 7, 100, 16))
  assert not np.array_equal(a, data.batch_indices(0, 8, 100, 16))
  assert len(set(a)) == 16  # without replacement within a batch


def test_temporary_files_of_the_run_stay_in_pytests_directory(
    temporary_files_under_pytests_directory, tmp_path, monkeypatch):
  """tfds leaves a tempfile.mkdtemp() behind for a data set it does not hold; with the
  conftest fixture it lands under pytest's directory (pruned), as a command line's do."""
  directory = temporary_files_under_pytests_directory
  before = set(os.listdir(directory))
  monkeypatch.setattr(tfds_source, "network_unreachable", lambda: "Name or service not known")
  with pytest.raises(DataError):
    data.load_images("tfds:mnist", "train", str(tmp_path / "tfds"))
  assert set(os.listdir(directory)) - before   # tfds's leftover, here and not in /tmp
  child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                         capture_output=True, text=True, check=True)
  assert child.stdout.strip() == directory
