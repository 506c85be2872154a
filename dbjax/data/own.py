"""Your own images: a folder of image files, one subfolder per class, or a .npz of arrays.

- "folder:<dir>": <dir>/<class>/<image files> (torchvision's and tfds' ImageFolder
  layout), or <dir>/train/<class>/... and <dir>/test/<class>/... where the split is made
  already. Files are decoded with Pillow; colour images are read as RGB (3 channels),
  greyscale ones as one channel. Images of different sizes are refused, unless
  `resize` (config data.resize) gives the square size they are all resized to
  (stretched, or with config data.center_crop scaled and cropped as ADM and DiT
  prepare ImageNet: `center_crop`). The
  classes are the subfolders' names in sorted order.
- "arrays:<file.npz>": `images` (N, H, W, C) and `labels` (N,), or `train_images`,
  `train_labels`, `test_images` and `test_labels`; optional `class_names`. Images are
  uint8 in [0, 255] or float in [-1, 1]. A .npz is read whole (numpy cannot read a
  compressed member by rows), so it is for sets that fit in RAM twice over; anything
  larger goes in "arrays:<dir>", the same arrays as .npy files (train_images.npy, ...,
  or images.npy and labels.npy; class_names.npy), whose images are read by rows.

A folder's files and a .npy's rows are read when a batch needs them (dbjax.data.rows),
so a set of any size trains; only a folder's file names and headers are read up front.

Without a test split of its own, a data set is split 80/20 by a fixed permutation, as
scikit-learn's digits are. Images come back as float32 in [-1, 1], as every image set.
Every problem (a missing file, an empty class folder, images of mixed sizes, a wrong
shape or dtype, labels out of range) is one DataError naming the file and the problem.
"""
import os

import numpy as np

from dbjax.data.rows import FileRows, NpyRows, Subset
from dbjax.errors import DataError, warn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEST_SHARE = 0.2


def split_rows(count: int, split: str) -> np.ndarray:
  """The rows of `split` in a set without a test split of its own: a fixed 80/20
  permutation (the same on every machine and run)."""
  order = np.random.default_rng(0).permutation(count)
  cut = int(round((1 - TEST_SHARE) * count))
  return order[:cut] if split == "train" else order[cut:]


def to_unit_range(images: np.ndarray, where: str) -> np.ndarray:
  """uint8 pixels, or floats already in [-1, 1], as float32 in [-1, 1]."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(images.dtype, np.floating):
    raise DataError(f"{where}: images of dtype {images.dtype}; expected uint8 in [0, 255] or "
                    "float in [-1, 1]")
  if not np.all(np.isfinite(images)):
    raise DataError(f"{where}: images contain NaN or inf")
  low, high = float(images.min(initial=0)), float(images.max(initial=0))
  if low < -1.001 or high > 1.001:
    raise DataError(f"{where}: float images span [{low:g}, {high:g}]; expected [-1, 1] (or "
                    "uint8 pixels in [0, 255])")
  if low >= 0 and images.size:  # [0, 1] pixels would train, a quarter of the range off
    warn(f"{where}: float images span [{low:g}, {high:g}], not [-1, 1]: if they are pixels "
         "in [0, 1], save them as 2 x - 1 (or as uint8)", stacklevel=3)
  return images.astype(np.float32)


# ---------------------------------------------------------------------------- folders


def class_folders(directory: str) -> list[str]:
  """The class subfolders of `directory`, sorted; DataError if there is none."""
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such folder of class subfolders")
  classes = sorted(d for d in os.listdir(directory)
                   if os.path.isdir(os.path.join(directory, d)) and not d.startswith("."))
  if not classes:
    raise DataError(f"{directory}: no class subfolders (expected <dir>/<class>/<images>)")
  return classes


def _image_files(folder: str) -> list[str]:
  # Hidden files are skipped: macOS's "._x.png" AppleDouble files are not images.
  files = sorted(f for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
  if not files:
    raise DataError(f"{folder}: an empty class folder (no {', '.join(IMAGE_SUFFIXES)} files)")
  return [os.path.join(folder, f) for f in files]


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# Greyscale modes of 16-bit pixels (a 16-bit PNG opens as "I;16" or "I"): scaled by
# 255 / 65535, where Pillow's convert("L") would clip everything above 255.
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")


def center_crop(image, size: int):
  """A PIL image's centre, size x size, after scaling its shorter side to `size`:
  ImageNet's preprocessing in ADM (Dhariwal & Nichol 2021, center_crop_arr) and DiT
  (Peebles & Xie 2023): box-filter halvings while the shorter side is at least twice
  `size` (an antialiased first step), then bicubic to exactly `size`, then the crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size),
                       resample=Image.Resampling.BICUBIC)
  left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
  return image.crop((left, top, left + size, top + size))


def prepare(image, resize: int, crop: bool):
  """A PIL image resized to resize x resize (0: as it is), by center_crop if `crop`
  (the aspect ratio kept), else stretched bicubically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not resize:
    return image
  if crop:
    return center_crop(image, resize)
  return image.resize((resize, resize), Image.Resampling.BICUBIC)


def decode(path: str, resize: int, colour: bool, crop: bool = False) -> np.ndarray:
  """One image file as uint8 (H, W, 3) if `colour` (greyscale as grey RGB), else
  (H, W, 1), resized as `prepare` says."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image, np.float64)
        image = Image.fromarray(np.clip(np.rint(wide * 255 / 65535), 0, 255).astype(np.uint8))
      image = prepare(image.convert("RGB" if colour else "L"), resize, crop)
      pixels = np.asarray(image, np.uint8)
  except OSError as e:
    raise DataError(f"{path}: not an image Pillow can read ({e})") from e
  return pixels if colour else pixels[..., None]


def _folder_files(directory: str) -> dict:
  """{split: [(path, label)]} of a folder, per split folder (train/, test/) where it has
  them, else all its files under "all"; class names come from class_folders."""
  has_splits = all(os.path.isdir(os.path.join(directory, s)) for s in ("train", "test"))
  roots = {s: os.path.join(directory, s) for s in ("train", "test")} if has_splits \
      else {"all": directory}
  return {split: [(path, label) for label, name in enumerate(class_folders(root))
                  for path in _image_files(os.path.join(root, name))]
          for split, root in roots.items()}


def folder_shape(directory: str, resize: int = 0) -> tuple[int, int]:
  """(side, channels) of every image of a folder, both splits, read from the files'
  headers alone: 3 channels if any image is in colour, the side `resize` or the one
  size they all share. One-line DataError for mixed or non-square sizes, naming a file,
  so both splits are checked before anything trains."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sizes, colour = {}, False
  for files in _folder_files(directory).values():
    for path, _ in files:
      try:
        with Image.open(path) as image:
          sizes.setdefault(image.size, path)
          colour = colour or image.mode not in GREY_MODES
      except OSError as e:
        raise DataError(f"{path}: not an image Pillow can read ({e})") from e
  channels = 3 if colour else 1
  if resize:
    return resize, channels
  if len(sizes) > 1:
    (_, first), (size, example) = sorted(sizes.items())[0], sorted(sizes.items())[-1]
    raise DataError(f"{directory}: images of mixed sizes {sorted(sizes)[:4]} (e.g. "
                    f"{example}, {size[0]} x {size[1]}, and {first}); set "
                    "config.data.resize=<size> to resize them all to <size> x <size>")
  (width, height), = sizes
  if height != width:
    raise DataError(f"{directory}: images are {height} x {width}; the networks take square "
                    "images: set config.data.resize=<size>")
  return width, channels


def read_folder(directory: str, split: str, resize: int = 0, crop: bool = False):
  """(images, labels int32 (N,), class names) of one split of an image folder (see the
  module docstring); the images are a FileRows, each file decoded when its row is read,
  so only the files' headers are read here."""
  has_splits = all(os.path.isdir(os.path.join(directory, s)) for s in ("train", "test"))
  root = os.path.join(directory, split) if has_splits else directory
  classes = class_folders(root)
  if has_splits and classes != class_folders(os.path.join(directory, "train")):
    raise DataError(f"{root}: its classes {classes} differ from the train split's")
  # Channels and size are the whole folder's (both splits), so a colour image in one
  # split, or a test split of another size, is settled or refused before training.
  side, channels = folder_shape(directory, resize)
  files = [(path, label) for label, name in enumerate(classes)
           for path in _image_files(os.path.join(root, name))]
  if not has_splits:
    files = [files[i] for i in sorted(split_rows(len(files), split))]
  images = FileRows([p for p, _ in files], side, channels, resize, crop,
                    f"folder:{directory} ({split})")
  return images, np.array([label for _, label in files], np.int32), tuple(classes)


# ----------------------------------------------------------------------------- arrays


NPY_SPLIT_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy",
                   "test_labels.npy")
NPY_WHOLE_FILES = ("images.npy", "labels.npy")


def read_npy_arrays(directory: str, split: str):
  """(images, labels int32, class names, number of classes) of one split of a folder of
  .npy files (NPY_SPLIT_FILES, or NPY_WHOLE_FILES split 80/20; optional
  class_names.npy): the images an NpyRows, each row read from disk when a batch needs
  it, the labels read whole."""
  names = set(os.listdir(directory))
  if set(NPY_SPLIT_FILES) <= names:
    images = NpyRows(os.path.join(directory, f"{split}_images.npy"))
    labels = np.load(os.path.join(directory, f"{split}_labels.npy"), allow_pickle=False)
    every_label = np.concatenate([np.load(os.path.join(directory, f"{s}_labels.npy"),
                                          allow_pickle=False).ravel() for s in ("train", "test")])
  elif set(NPY_WHOLE_FILES) <= names:
    images = NpyRows(os.path.join(directory, "images.npy"))
    every_label = np.load(os.path.join(directory, "labels.npy"), allow_pickle=False)
    if every_label.shape != images.shape[:1]:
      raise DataError(f"{directory}/labels.npy: labels of shape {every_label.shape}; "
                      f"expected ({len(images)},), one per image")
    rows = np.sort(split_rows(len(every_label), split))
    images, labels = Subset(images, rows), every_label[rows]
  else:
    raise DataError(f"{directory}: holds {sorted(names)[:8]}; expected "
                    f"{', '.join(NPY_SPLIT_FILES)}, or {', '.join(NPY_WHOLE_FILES)}")
  class_names = ()
  if "class_names.npy" in names:
    class_names = tuple(str(n) for n in np.load(os.path.join(directory, "class_names.npy"),
                                                allow_pickle=False))
  labels = _checked_labels(labels, len(images), class_names, directory)
  return images, labels, class_names, len(class_names) or int(every_label.max(initial=0)) + 1


def _checked_labels(labels, count: int, class_names: tuple, where: str) -> np.ndarray:
  """labels as int32, DataError naming `where` unless one integer per image, each a
  class: >= 0 and below len(class_names) where the set names its classes."""
  if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{where}: labels of shape {labels.shape} and dtype {labels.dtype}; "
                    f"expected integers ({count},), one per image")
  if labels.size and labels.min() < 0:
    raise DataError(f"{where}: labels span [{labels.min()}, {labels.max()}]; expected "
                    "0, 1, ... (one integer per class)")
  if class_names and labels.size and labels.max() >= len(class_names):
    raise DataError(f"{where}: labels span [0, {labels.max()}] but class_names holds "
                    f"{len(class_names)} names")
  return labels.astype(np.int32)


def read_arrays(path: str, split: str):
  """(images, labels int32, class names, number of classes) of one split of a .npz
  (read whole: a small set) or of a folder of .npy files (read_npy_arrays: read by
  rows, any size); the classes are class_names', else 0 .. the largest label."""
  if os.path.isdir(path):
    return read_npy_arrays(path, split)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such .npz file or folder of .npy files")
  try:
    arrays = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a .npz file numpy can read ({e})") from e
  with arrays:
    keys = set(arrays.files)
    if {"train_images", "train_labels", "test_images", "test_labels"} <= keys:
      images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
      every_label = np.concatenate([arrays["train_labels"].ravel(),
                                    arrays["test_labels"].ravel()])
      rows = None
    elif {"images", "labels"} <= keys:
      images, labels = arrays["images"], arrays["labels"]
      every_label = labels.ravel()
      rows = np.sort(split_rows(len(labels), split))
    else:
      raise DataError(f"{path}: holds {sorted(keys)}; expected 'images' and 'labels', or "
                      "'train_images', 'train_labels', 'test_images' and 'test_labels'")
    names = tuple(str(n) for n in arrays["class_names"]) if "class_names" in keys else ()
  if images.ndim == 3:  # (N, H, W): one channel
    images = images[..., None]
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise DataError(f"{path}: images of shape {images.shape}; expected (N, H, W, C) with "
                    "H = W (square images)")
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{path}: labels of shape {labels.shape} and dtype {labels.dtype}; "
                    f"expected integers ({images.shape[0]},), one per image")
  if rows is not None:
    images, labels = images[rows], labels[rows]
  labels = _checked_labels(labels, len(images), names, path)
  num_classes = len(names) or int(every_label.max(initial=0)) + 1
  return to_unit_range(images, path), labels, names, num_classes
