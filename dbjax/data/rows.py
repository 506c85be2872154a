"""Image rows read on demand: a batch reads and decodes only its own rows.

A data set larger than the host's memory trains, and a host holds only the rows of the
batches it builds (its devices' rows: dbjax.engine.placement.local_rows). Every
source is a RowSource: `rows[index]` is float32 (len(index), H, W, C), as an array's
rows would be, with `shape`, `len`, slicing and `np.asarray(rows)` (the whole set,
for small ones and tests).

  NpyRows   a .npy file, each row read with os.pread at its offset
  FileRows  one image file per row (a folder), decoded with Pillow
  TfdsRows  a tfds data source (array_record files), its rows decoded as read

`in_ram(rows, budget)` decodes a set whole into RAM when it fits under a stated budget
(config data.cache_bytes) and says so: the same values, read once.

Files are read, never memory-mapped: a mapping counts against a cap on the process's
address space, and the pages it touches stay in its resident set, where a read leaves
them to the kernel's page cache.
"""
import os

import numpy as np

from dbjax.errors import DataError

# Rows read at a time by `chunks` (a pass over a whole set in bounded memory).
CHUNK_ROWS = 4096


def pixels_to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels as float32 in [-1, 1] (the one conversion every source uses)."""
  return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class RowSource:
  """Rows of a data set read when indexed; subclasses set `shape` and `read` (and
  `dtype` and `ndim` where their rows are not float32 images: token rows)."""
  dtype = np.dtype(np.float32)
  ndim = 4
  shape: tuple = ()
  where = "a data set"  # in error messages: the file or folder the rows come from

  def read(self, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (int64 in [0, N), any order, repeats allowed) as `dtype`."""
    raise NotImplementedError

  def read_range(self, start: int, stop: int) -> np.ndarray:
    """Rows start .. stop - 1 (a source that reads them in one go overrides this)."""
    return self.read(np.arange(start, stop, dtype=np.int64))

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def nbytes(self) -> int:
    """The set's size as `dtype`, what holding it in RAM takes."""
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice) and index.step in (None, 1):  # consecutive rows
      start, stop, _ = index.indices(len(self))
      return self.read_range(start, max(stop, start))
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    index = np.asarray(index)
    scalar = index.ndim == 0
    index = np.atleast_1d(index).astype(np.int64)
    if index.size and (index.min() < -len(self) or index.max() >= len(self)):
      raise IndexError(f"rows {index.min()}..{index.max()} of {len(self)} in {self.where}")
    out = self.read(np.where(index < 0, index + len(self), index))
    return out[0] if scalar else out

  def __array__(self, dtype=None, copy=None):
    del copy  # always a new array
    whole = self[:]
    return whole if dtype is None else whole.astype(dtype)

  def chunks(self, size: int = CHUNK_ROWS):
    """(first row, rows) of consecutive blocks of `size` rows: the whole set in bounded
    memory."""
    for start in range(0, len(self), size):
      yield start, self[start:start + size]


class FileOffsetRows(RowSource):
  """Rows of one file at fixed offsets, each read with os.pread: subclasses set `path`,
  `offset`, `row_bytes`, `file_dtype` and `shape`, and say in `_convert` what a row as
  stored becomes (by default, itself)."""
  path: str
  offset = 0
  row_bytes: int
  file_dtype: np.dtype

  def _convert(self, stored: np.ndarray, rows: np.ndarray) -> np.ndarray:
    del rows  # which rows these are, for a subclass's error messages
    return stored

  def _pread(self, fd: int, first: int, count: int) -> np.ndarray:
    raw = os.pread(fd, count * self.row_bytes, self.offset + first * self.row_bytes)
    return np.frombuffer(raw, self.file_dtype).reshape(count, *self.shape[1:])

  def read_range(self, start: int, stop: int) -> np.ndarray:
    fd = os.open(self.path, os.O_RDONLY)
    try:
      return self._convert(self._pread(fd, start, stop - start), np.arange(start, stop))
    finally:
      os.close(fd)

  def read(self, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), *self.shape[1:]), self.file_dtype)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      for i, row in enumerate(rows):
        out[i] = self._pread(fd, int(row), 1)[0]
    finally:
      os.close(fd)
    return self._convert(out, rows)

  def stored_chunks(self, size: int = CHUNK_ROWS):
    """(first row, rows as stored: file_dtype, unconverted and unchecked) of consecutive
    blocks of `size` rows, for copying a file's bits (dbjax.data.latents joins parts)."""
    fd = os.open(self.path, os.O_RDONLY)
    try:
      for start in range(0, len(self), size):
        yield start, self._pread(fd, start, min(size, len(self) - start))
    finally:
      os.close(fd)


class NpyRows(FileOffsetRows):
  """The rows of a .npy file (N, H, W, C) in C order: uint8 pixels, read as [-1, 1], or
  floats, read as stored times `scale`. A row holding NaN or inf, or (bounded: images)
  a value outside [-1, 1], is refused as it is read, naming the file and the row:
  opening a file reads nothing but its header."""

  def __init__(self, path: str, scale: float = 1.0, dtypes=(np.uint8, np.float16, np.float32),
               bounded: bool = True, what: str = "images"):
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such .npy file")
    self.path = self.where = path
    self.scale, self.bounded = float(scale), bounded
    try:
      with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        self.offset = f.tell()
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: not a .npy file numpy can read ({e})") from e
    if fortran or np.dtype(dtype) not in [np.dtype(d) for d in dtypes]:
      raise DataError(f"{path}: {what} of dtype {dtype}{' (Fortran order)' if fortran else ''}"
                      f"; expected {' or '.join(np.dtype(d).name for d in dtypes)} in C order")
    if len(shape) == 3:  # (N, H, W): one channel
      shape = (*shape, 1)
    if len(shape) != 4 or shape[1] != shape[2]:
      raise DataError(f"{path}: {what} of shape {shape}; expected (N, H, W, C) with H = W")
    self.shape, self.file_dtype = tuple(shape), np.dtype(dtype)
    self.row_bytes = int(np.prod(shape[1:])) * self.file_dtype.itemsize
    expected = self.offset + shape[0] * self.row_bytes
    if os.path.getsize(path) != expected:
      raise DataError(f"{path}: {os.path.getsize(path)} bytes, its header says "
                      f"{expected} (a file cut short?)")

  def _convert(self, stored: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if self.file_dtype == np.uint8:
      return pixels_to_unit_range(stored)
    values = stored.astype(np.float32) * np.float32(self.scale)
    flat = values.reshape(len(values), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
      raise DataError(f"{self.path}: row {int(rows[np.argmax(bad)])} holds NaN or inf")
    if self.bounded and len(values):
      outside = (np.abs(flat) > 1.001).any(axis=1)
      if outside.any():
        row = int(np.argmax(outside))
        raise DataError(f"{self.path}: row {int(rows[row])} spans [{flat[row].min():g}, "
                        f"{flat[row].max():g}]; expected images in [-1, 1] (or uint8 pixels)")
    return values


class Subset(RowSource):
  """Rows `index` of another source (a split made by a fixed permutation)."""

  def __init__(self, source: RowSource, index):
    self.source, self.index = source, np.asarray(index, np.int64)
    self.shape, self.where = (len(self.index), *source.shape[1:]), source.where

  def read(self, rows: np.ndarray) -> np.ndarray:
    return self.source.read(self.index[rows])


class FileRows(RowSource):
  """One image file per row, decoded with Pillow when read (dbjax.data.own.decode),
  all (side, side, channels): the folder's shape, settled from the files' headers."""

  def __init__(self, paths, side: int, channels: int, resize: int, crop: bool, where: str):
    self.paths, self.resize, self.crop, self.colour = list(paths), resize, crop, channels == 3
    self.shape, self.where = (len(self.paths), side, side, channels), where

  def read(self, rows: np.ndarray) -> np.ndarray:
    from dbjax.data.own import decode  # pylint: disable=g-import-not-at-top
    if not len(rows):
      return np.zeros((0, *self.shape[1:]), np.float32)
    return pixels_to_unit_range(np.stack([decode(self.paths[r], self.resize, self.colour,
                                                 self.crop) for r in rows]))


class TfdsRows(RowSource):
  """The images of a tfds data source (tfds.data_source: array_record files, no
  TensorFlow), each decoded by tfds when read, then resized (0: as they are) as
  dbjax.data.own.prepare says; greyscale ones (H, W) get a channel."""

  def __init__(self, source, shape: tuple, where: str, resize: int = 0, crop: bool = False):
    self.source, self.shape, self.where = source, tuple(shape), where
    self.resize, self.crop = resize, crop

  def _image(self, row: int) -> np.ndarray:
    image = np.asarray(self.source[row]["image"])
    if not self.resize:
      return image
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from dbjax.data.own import prepare  # pylint: disable=g-import-not-at-top
    return np.asarray(prepare(Image.fromarray(image.squeeze()), self.resize, self.crop))

  def read(self, rows: np.ndarray) -> np.ndarray:
    if not len(rows):
      return np.zeros((0, *self.shape[1:]), np.float32)
    images = np.stack([self._image(int(r)) for r in rows])
    return pixels_to_unit_range(images.reshape(len(rows), *self.shape[1:]))


def in_ram(rows: RowSource, budget_bytes: int, log=print):
  """`rows` decoded whole into a float32 array where the set fits in budget_bytes,
  else `rows` as they are (read by rows); either way one line says which, and why."""
  size_mib = rows.nbytes / 2**20
  if rows.nbytes <= budget_bytes:
    log(f"{rows.where}: {len(rows):,} images ({size_mib:,.0f} MiB as float32) held in RAM "
        f"(under config.data.cache_bytes={budget_bytes:,})")
    return np.asarray(rows)
  log(f"{rows.where}: {len(rows):,} images ({size_mib:,.0f} MiB as float32) read by rows as "
      f"batches need them (over config.data.cache_bytes={budget_bytes:,})")
  return rows
