"""Image data sets as in-memory arrays, and a step-indexed batch order.

- "digits": scikit-learn's 8x8 handwritten digits (1797 images), shipped with the
  package, so the main job needs no download. Split 80/20 by a fixed permutation.
- "fashion_mnist": the original IDX files, e.g. from Debian's dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist), or any directory given as data.data_dir.
- "tfds:<name>" (mnist, cifar10, ...): read with tfds.data_source from array_record
  files, which needs no TensorFlow; downloads and prepares where the internet is there.
- Your own: "folder:<dir>" (a subfolder per class) and "arrays:<file.npz>"
  (dbjax.data.own), and an autoencoder's latents on disk, "latents:<dir>", of any size
  (dbjax.data.latents).

Images come back as float32 (N, H, W, C) in [-1, 1] (latents: scaled to unit variance)
and labels as int32 (N,). Folders, .npy arrays, tfds sets and latents are read by rows
as batches need them (dbjax.data.rows), unless they fit under config data.cache_bytes,
when they are decoded into RAM once; the first two sources are small and held whole.
The batch of iteration `step` is a pure function of (seed, step)
(dbjax.data.batches), so a resumed run sees exactly the batches an uninterrupted one
would.
"""
import dataclasses
import gzip
import json
import os
import struct

import numpy as np

from dbjax.data import latents, own, rows, tfds_source
from dbjax.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES_FILE = "classes.json"  # a run's class names, in label order


@dataclasses.dataclass(frozen=True)
class ImageData:
  images: np.ndarray   # float32 (N, H, W, C) in [-1, 1], or a dbjax.data.rows.RowSource
  labels: np.ndarray   # int32 (N,)
  num_classes: int
  class_names: tuple = ()       # the classes' names, where the data has them
  latents: dict | None = None   # a latent set's latents.json (scale, decoder, source)

  @property
  def num_examples(self) -> int:
    """How many images the split holds."""
    return len(self.labels)

  def batch(self, index):
    """The step's inputs: (images, labels) of the examples in `index`."""
    return self.images[index], self.labels[index]


def _digits(split: str) -> ImageData:
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  cut = int(0.8 * len(order))
  index = order[:cut] if split == "train" else order[cut:]
  images = digits.images[index, :, :, None].astype(np.float32) / 16.0 * 2.0 - 1.0
  return ImageData(images, digits.target[index].astype(np.int32), 10)


def read_idx(path: str) -> np.ndarray:
  """An IDX file (LeCun's MNIST format, optionally gzipped) as a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
    raise DataError(f"{path} is not an IDX file of unsigned bytes")
  ndim = raw[3]
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise DataError(f"{path} holds {data.size} bytes of data, its header says {shape}")
  return data.reshape(shape)


def _fashion_mnist(split: str, data_dir: str) -> ImageData:
  directory = data_dir or FASHION_MNIST_DIR
  prefix = "train" if split == "train" else "t10k"
  paths = [os.path.join(directory, f"{prefix}-{kind}-idx{n}-ubyte.gz")
           for kind, n in (("images", 3), ("labels", 1))]
  for path in paths:
    if not os.path.exists(path):
      raise DataError(
          f"Fashion-MNIST file {path} not found: install Debian's dataset-fashion-mnist "
          f"(apt-get install dataset-fashion-mnist) or set config.data.data_dir to a "
          "directory with the four IDX .gz files")
  images, labels = (read_idx(p) for p in paths)
  return ImageData(images[..., None].astype(np.float32) / 127.5 - 1.0,
                   labels.astype(np.int32), 10)


def _tfds(name: str, split: str, data_dir: str, cache_bytes: int, resize: int,
          crop: bool) -> ImageData:
  source = tfds_source.data_source(name, split, data_dir)
  if not len(source):
    raise DataError(f"tfds data set {name!r} split {split!r} is empty")
  first = np.asarray(source[0]["image"])
  channels = first.shape[-1] if first.ndim == 3 else 1
  shape = (len(source), *((resize, resize) if resize else first.shape[:2]), channels)
  labels = tfds_source.read_labels(name, split, data_dir, source)
  builder_info = getattr(source, "dataset_info", None)
  num_classes = (builder_info.features["label"].num_classes if builder_info is not None
                 else int(labels.max()) + 1)
  images = rows.in_ram(rows.TfdsRows(source, shape, f"tfds:{name} ({split})", resize, crop),
                       cache_bytes)
  return ImageData(images, labels, num_classes)


def _own(kind: str, where: str, split: str, resize: int, cache_bytes: int,
         crop: bool) -> ImageData:
  if kind == "folder":
    images, labels, names = own.read_folder(where, split, resize, crop)
    return ImageData(rows.in_ram(images, cache_bytes), labels, len(names), names)
  images, labels, names, num_classes = own.read_arrays(where, split)
  if isinstance(images, rows.RowSource):
    images = rows.in_ram(images, cache_bytes)
  return ImageData(images, labels, num_classes, names)


def _latents(directory: str, split: str) -> ImageData:
  latent_rows, labels, info = latents.read_latents(directory, split)
  return ImageData(latent_rows, labels, int(info["num_classes"]),
                   tuple(info.get("class_names") or ()), info)


SOURCES = ("digits", "fashion_mnist", "tfds:<name>", "folder:<dir>", "arrays:<file.npz>",
           "latents:<dir>")


# Sets read by rows (folders, .npy arrays, tfds) whose float32 images fit in this many
# bytes are decoded whole into RAM once (config data.cache_bytes).
CACHE_BYTES = 512 * 2**20


def load_images(name: str, split: str, data_dir: str = "", resize: int = 0,
                cache_bytes: int = CACHE_BYTES, center_crop: bool = False) -> ImageData:
  """The `split` ("train" or "test") of data set `name`; see the module docstring.
  resize: a folder's or tfds set's images resized to resize x resize (0: a folder's
  refused if sizes differ); center_crop: scaled and cropped to it, as ADM and DiT
  prepare ImageNet (dbjax.data.own.center_crop), not stretched.
  cache_bytes: a folder, .npy or tfds set at most this large as float32 is decoded
  into RAM whole; a larger one is read by rows as batches need them (dbjax.data.rows).
  Either way a line says which."""
  if split not in ("train", "test"):
    raise DataError(f"split={split!r} is not one of ('train', 'test')")
  kind, _, where = name.partition(":")
  if center_crop and not resize:
    raise DataError("config.data.center_crop=True needs config.data.resize=<size>: the side "
                    "the images are cropped to (256 for ImageNet, as ADM and DiT)")
  if name == "digits":
    return _digits(split)
  if name == "fashion_mnist":
    return _fashion_mnist(split, data_dir)
  if kind == "tfds" and where:
    return _tfds(where, split, data_dir, cache_bytes, resize, center_crop)
  if kind in ("folder", "arrays") and where:
    return _own(kind, os.path.expanduser(where), split, resize, cache_bytes, center_crop)
  if kind == "latents" and where:
    return _latents(os.path.expanduser(where), split)
  raise DataError(f"config.data.name={name!r} is not one of {', '.join(map(repr, SOURCES))}")


def check_images(images, labels, image_size: int, channels: int, num_classes: int,
                 what: str = "images"):
  """Raise DataError unless images are float (N, image_size, image_size, channels),
  finite, and labels are integers in [0, num_classes). Latents on disk were checked as
  they are read (dbjax.data.rows): their shape only, so they are not read whole."""
  on_disk = isinstance(images, rows.RowSource)
  images, labels = (images if on_disk else np.asarray(images)), np.asarray(labels)
  expected = (image_size, image_size, channels)
  if images.ndim != 4 or images.shape[1:] != expected:
    raise DataError(f"{what} have shape {images.shape}; expected (N, {image_size}, "
                    f"{image_size}, {channels}) from config.data.image_size and .channels")
  if images.shape[0] == 0:
    raise DataError(f"{what} are empty: no examples to train or test on")
  if not np.issubdtype(images.dtype, np.floating):
    raise DataError(f"{what} have dtype {images.dtype}; expected a float dtype scaled to "
                    "[-1, 1] (see dbjax.data.load_images)")
  if not on_disk and not np.all(np.isfinite(images)):
    raise DataError(f"{what} contain NaN or inf")
  if labels.shape != images.shape[:1]:
    raise DataError(f"labels have shape {labels.shape}; expected ({images.shape[0]},)")
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"labels have dtype {labels.dtype}; expected integers")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"labels span [{labels.min()}, {labels.max()}]; allowed is "
                    f"[0, {num_classes}) from config.data.num_classes")


def write_class_names(workdir: str, train):
  """<workdir>/classes.json: the class names in label order, where the data names its
  classes (a folder's subfolders, a latent set's), so a loaded run can say which label
  is which without its data (dbjax.train.load_run)."""
  names = getattr(train, "class_names", ())  # a user's data object may have none
  if names:
    with open(os.path.join(workdir, CLASSES_FILE), "w", encoding="utf-8") as f:
      json.dump(list(names), f)


def read_class_names(workdir: str) -> tuple:
  """The class names a run saved (write_class_names), or () where it saved none."""
  path = os.path.join(workdir, CLASSES_FILE)
  if not os.path.exists(path):
    return ()
  with open(path, encoding="utf-8") as f:
    return tuple(json.load(f))
