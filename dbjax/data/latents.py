"""Autoencoder latents on disk: "latents:<dir>", any size.

A DiT at ImageNet's 256 x 256 trains on an autoencoder's latents, not on pixels (paper,
Sec. 5.1, after Peebles and Xie 2023: Stable Diffusion's VAE, 32 x 32 x 4). The
directory holds

  train_latents.npy  (N, h, w, c) float16 or float32, the encoder's raw output
  train_labels.npy   (N,) integers
  test_latents.npy, test_labels.npy   the same for the test split
  latents.json       {"scale_factor", "scale_rule", "shape": [h, w, c], "source": the
                      data set they encode, "data_dir" and "resize" it was read with,
                      "encoder" and "decoder": "module:function" (decoder null for none),
                      "checkpoint": their weights (their argument) or null,
                      "checkpoint_sha256": a hash of those weights' files, "rows" per
                      split, "num_classes", "class_names"}
  <split>_latents.made_by.json   what made the split's rows (encoder, weights' hash,
                      source and how it was read, row count, image shape): rows are
                      resumed or reused only when all of it matches

experiments/encode_latents.py writes it. A batch is read row by row from the file
(dbjax.data.rows.NpyRows: os.pread at each row's offset), never the array whole and
never memory-mapped, and opening a split reads only its header. So a set larger than
the host's memory trains, and a step's batch is still a pure function of (seed, step). Latents are multiplied by scale_factor as they are read (unit variance, as latent
diffusion has it; the config's diffusion.sigma_data says so to EDM).
"""
import hashlib
import importlib
import json
import os
import socket

import numpy as np

from dbjax.data.rows import NpyRows
from dbjax.errors import DataError

INFO_FILE = "latents.json"
def _require_file(path: str):
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file (a latents directory holds train_latents.npy, "
                    f"train_labels.npy, test_latents.npy, test_labels.npy and {INFO_FILE}; "
                    "experiments/encode_latents.py writes them)")


class LatentRows(NpyRows):
  """The rows of a .npy file of latents (float16 or float32), read from disk only when
  indexed, each times `scale`: `rows[index]` is float32 (len(index), h, w, c). A row
  holding NaN or inf is refused as it is read, naming it (dbjax.data.rows.NpyRows)."""

  def __init__(self, path: str, scale: float = 1.0):
    _require_file(path)
    super().__init__(path, scale, dtypes=(np.float16, np.float32), bounded=False,
                     what="latents")


def read_info(directory: str) -> dict:
  """latents.json of a latents directory, checked."""
  path = os.path.join(directory, INFO_FILE)
  _require_file(path)
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
  except ValueError as e:
    raise DataError(f"{path}: not JSON ({e})") from e
  for field in ("scale_factor", "shape", "num_classes"):
    if field not in info:
      raise DataError(f"{path}: no {field!r} (it holds {sorted(info)})")
  if not (isinstance(info["scale_factor"], (int, float)) and info["scale_factor"] > 0):
    raise DataError(f"{path}: scale_factor={info['scale_factor']!r}; expected a positive "
                    "number")
  return info


def read_latents(directory: str, split: str):
  """(LatentRows, labels int32 (N,), info) of one split, every problem one DataError."""
  info = read_info(directory)
  rows = LatentRows(os.path.join(directory, f"{split}_latents.npy"), info["scale_factor"])
  if list(rows.shape[1:]) != list(info["shape"]):
    raise DataError(f"{rows.path}: latents of shape {rows.shape[1:]}; {INFO_FILE} says "
                    f"{tuple(info['shape'])}")
  labels_path = os.path.join(directory, f"{split}_labels.npy")
  _require_file(labels_path)
  labels = np.load(labels_path, allow_pickle=False)
  if labels.shape != (len(rows),) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{labels_path}: labels of shape {labels.shape} and dtype {labels.dtype};"
                    f" expected integers ({len(rows)},), one per latent")
  if labels.size and (labels.min() < 0 or labels.max() >= info["num_classes"]):
    raise DataError(f"{labels_path}: labels span [{labels.min()}, {labels.max()}]; allowed "
                    f"is [0, {info['num_classes']}) ({INFO_FILE}'s num_classes)")
  return rows, labels.astype(np.int32), info


def resolve_function(spec: str, what: str):
  """The function a "module:function" names; DataError naming `what` unless it exists."""
  module_name, _, name = spec.partition(":")
  try:
    function = getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise DataError(f"{what}={spec!r}: no such function (expected 'module:function'): "
                    f"{e}") from e
  if not callable(function):
    raise DataError(f"{what}={spec!r} is not callable")
  return function


def check_decoder_weights(info: dict):
  """DataError unless the decoder's checkpoint is the one the set was encoded with (its
  SHA-256 in latents.json): a retrained autoencoder decodes old latents into noise, with
  no error of its own. Sets written before the hash was recorded pass."""
  recorded = info.get("checkpoint_sha256")
  if recorded is None:
    return
  now = weights_sha256(info.get("checkpoint"))
  if now != recorded:
    raise DataError(f"{info.get('checkpoint')}: the decoder's weights changed since these "
                    f"latents were encoded (SHA-256 {recorded[:12]}... then, "
                    f"{now[:12] + '...' if now else 'no such path'} now); encode them again "
                    "(experiments/encode_latents.py --overwrite) or restore those weights")


def decode(info: dict, latents: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Scaled latents back to images in [-1, 1] with the set's decoder, in batches, once
  its weights are checked to be the ones that encoded the set."""
  decoder = resolve_function(info["decoder"], "latents.json decoder")
  check_decoder_weights(info)
  unscaled = np.asarray(latents, np.float32) / np.float32(info["scale_factor"])
  return np.concatenate([np.asarray(decoder(unscaled[i:i + batch_size], info.get("checkpoint")),
                                    np.float32)
                         for i in range(0, len(unscaled), batch_size)])


# ------------------------------------------------------------------------- writing


def _progress_path(path: str) -> str:
  """Where the rows done of the array being written to `path` are recorded."""
  head, name = os.path.split(path)
  return os.path.join(head, f".{name[:-len('.npy')]}.rows_done")


def _rows_done(path: str) -> int:
  progress = _progress_path(path)
  if not os.path.exists(progress) or not os.path.exists(path + ".partial"):
    return 0
  with open(progress) as f:
    return int(f.read().strip() or 0)


def _write_atomically(path: str, text: str):
  with open(path + ".tmp", "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def weights_sha256(checkpoint) -> str | None:
  """SHA-256 of the files at `checkpoint` (a file, or every file below a directory, by
  relative path), or None where it names no path (a hub model's name, say): what
  identifies an encoder's or decoder's weights, so that a set is never decoded, or
  resumed, by weights other than the ones that made it."""
  if not checkpoint or not os.path.exists(checkpoint):
    return None
  if os.path.isfile(checkpoint):
    with open(checkpoint, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  from dbjax.engine.file_listings import file_checksums  # pylint: disable=g-import-not-at-top
  listing = json.dumps(file_checksums(checkpoint), sort_keys=True)
  return hashlib.sha256(listing.encode()).hexdigest()


def _made_by_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}_latents.made_by.json")


def _read_made_by(directory: str, split: str) -> dict | None:
  path = _made_by_path(directory, split)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _what_differs(recorded: dict | None, made_by: dict) -> str | None:
  """A phrase naming the first field of made_by that the record lacks or holds another
  value of; None where they agree."""
  if recorded is None:
    return "no record of what made them"
  for field, value in made_by.items():
    if recorded.get(field) != value:
      return f"{field} was {recorded.get(field)!r}, this run's is {value!r}"
  return None


def part_path(directory: str, split: str, part: int, parts: int) -> str:
  """The file of process `part`'s rows of a split encoded by `parts` processes."""
  return os.path.join(directory, f"{split}_latents.part-{part}-of-{parts}.npy")


def part_rows(count: int, batch_size: int, part: int, parts: int) -> tuple[int, int]:
  """(first, last + 1) rows of process `part` of `parts`: consecutive ranges that start
  at multiples of batch_size, so every process encodes exactly the batches one process
  would, and the assembled rows are the same bits."""
  batches = -(-count // batch_size)
  per_part = -(-batches // parts)
  first = min(part * per_part * batch_size, count)
  return first, min(first + per_part * batch_size, count)


def _split_files(directory: str, split: str) -> list[str]:
  """Every file of a split's rows there is, whole, partial or in parts."""
  prefix = f"{split}_latents."
  return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
          if name.startswith(prefix) and name.endswith((".npy", ".npy.partial"))]


def _remove_split(directory: str, split: str):
  for path in _split_files(directory, split):
    os.remove(path)
    if os.path.exists(_progress_path(path.removesuffix(".partial"))):
      os.remove(_progress_path(path.removesuffix(".partial")))
  for path in (_made_by_path(directory, split),
               os.path.join(directory, f"{split}_labels.npy")):
    if os.path.exists(path):
      os.remove(path)


def _write_rows(encode, images, first: int, last: int, path: str, batch_size: int,
                dtype, bar=None):
  """Encode rows first .. last - 1 of `images` into the .npy at `path`, resumably.

  Written in chunks to <path>.partial, each chunk flushed to disk before a small file
  records the rows done, so a run killed at any moment resumes at the first row not
  recorded and rewrites nothing before it; the array takes its final name only when
  every row is there, so a half-written array never looks complete. Every batch has
  batch_size rows (the last one padded), so one compiled encoder serves all."""
  partial = path + ".partial"
  done = _rows_done(path)
  if bar is not None:
    bar.already_done(done)  # not the compilation: that is the first batch encoded
  out = None
  for start in range(first + done, last, batch_size):
    rows = np.asarray(images[start:min(start + batch_size, last)], np.float32)
    padded = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), 0)])
    latents = np.asarray(encode(padded), np.float32)[:len(rows)]
    if out is None:
      out = np.lib.format.open_memmap(partial, mode="r+" if done else "w+", dtype=dtype,
                                      shape=(last - first, *latents.shape[1:]))
    out[start - first:start - first + len(rows)] = latents
    out.flush()
    _write_atomically(_progress_path(path), str(start + len(rows) - first))
    if bar is not None:
      bar.update(len(rows))
  del out
  os.replace(partial, path)
  if os.path.exists(_progress_path(path)):
    os.remove(_progress_path(path))


def _take_lock(path: str) -> bool:
  """Create the lock file `path` (holding this host and process id) unless another
  process holds it; a lock left by a dead process of this host is taken over."""
  owner = f"{socket.gethostname()} {os.getpid()}"
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      with open(path) as f:
        host, _, pid = f.read().partition(" ")
      if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
        return False
      os.remove(path)  # its process died while assembling: start again
      continue
    with os.fdopen(fd, "w") as f:
      f.write(owner)
    return True
  return False


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _assemble(directory: str, split: str, paths: list[str]) -> str | None:
  """<split>_latents.npy from the part files `paths`, in order, once all are written,
  by the one process that takes the split's lock (the others return None: it is done
  or being done). Copied a part at a time, in bounded memory."""
  final = os.path.join(directory, f"{split}_latents.npy")
  if not all(os.path.exists(p) for p in paths):
    return None
  lock = os.path.join(directory, f".{split}_latents.assembling")
  if not _take_lock(lock):
    return None
  pieces = [LatentRows(p) for p in paths]
  out = np.lib.format.open_memmap(final + ".partial", mode="w+", dtype=pieces[0].file_dtype,
                                  shape=(sum(len(p) for p in pieces), *pieces[0].shape[1:]))
  first = 0
  for piece in pieces:
    for start, stored in piece.stored_chunks():
      out[first + start:first + start + len(stored)] = stored
    first += len(piece)
  out.flush()
  del out
  os.replace(final + ".partial", final)
  for path in paths:
    os.remove(path)
  os.remove(lock)
  return final


def encode_split(encode, images, labels: np.ndarray, directory: str, split: str,
                 batch_size: int, made_by: dict, bar=None, overwrite: bool = False,
                 dtype: str = "float32", part: tuple[int, int] = (0, 1)) -> str | None:
  """Encode `images` (anything indexable by a slice of rows: an array or a
  dbjax.data.rows source, read a batch at a time) in batches of batch_size and write
  <directory>/<split>_latents.npy (as `dtype`: float32, or float16 at half the disk)
  and <split>_labels.npy; return the latents' path (None while other processes'
  parts are missing).

  made_by (JSON-able) says what makes the rows: the encoder, a hash of its weights, the
  source and how it was read. It is written beside the rows before the first one, and
  its row count, image shape and dtype are added to it. Rows already there, whole,
  partial or in parts, are kept only when their record matches in every field;
  otherwise a DataError names the first field that differs, or, with overwrite, they
  are deleted and encoded again. So a retrained encoder, or another data set, never
  hands back the old rows.

  part (k, n): this process encodes the k-th of n ranges of rows (part_rows) into a
  part file; the process that completes the last part assembles the split. The rows
  are the same bits as one process writes (for a deterministic encoder), and each
  range resumes after a kill as a whole split does (_write_rows)."""
  final = os.path.join(directory, f"{split}_latents.npy")
  count = len(labels)
  if count == 0:
    raise DataError(f"the {split} split of {made_by.get('source', 'the data')!r} holds no "
                    "images; nothing to encode")
  made_by = {**made_by, "rows": count, "image_shape": list(np.shape(images)[1:]),
             "dtype": np.dtype(dtype).name}
  existing = _split_files(directory, split)
  if existing:
    differs = _what_differs(_read_made_by(directory, split), made_by)
    if differs and not overwrite:
      raise DataError(f"{existing[0]}: made by other settings ({differs}); encode into "
                      "another directory, or pass --overwrite to encode again")
    if differs:  # and the set's latents.json: it is no longer complete
      _remove_split(directory, split)
      if os.path.exists(os.path.join(directory, INFO_FILE)):
        os.remove(os.path.join(directory, INFO_FILE))
  if os.path.exists(final):
    if bar is not None:
      bar.already_done(count)
    return final
  _write_atomically(_made_by_path(directory, split), json.dumps(made_by, indent=2))
  # Before the rows take their final name: a split whose rows are complete has labels.
  labels_path = os.path.join(directory, f"{split}_labels.npy")
  np.save(f"{labels_path}.{os.getpid()}.npy", np.asarray(labels, np.int32))
  os.replace(f"{labels_path}.{os.getpid()}.npy", labels_path)  # whole, as processes race
  k, parts = part
  if parts == 1:
    _write_rows(encode, images, 0, count, final, batch_size, dtype, bar)
    return final
  ranges = [part_rows(count, batch_size, i, parts) for i in range(parts)]
  paths = [part_path(directory, split, i, parts) for i, (a, b) in enumerate(ranges) if a < b]
  first, last = ranges[k]
  if first < last and not os.path.exists(part_path(directory, split, k, parts)):
    _write_rows(encode, images, first, last, part_path(directory, split, k, parts),
                batch_size, dtype, bar)
  return _assemble(directory, split, paths)


def unit_variance_scale(path: str) -> float:
  """1 / the standard deviation of every latent in the .npy at `path` (the latent
  diffusion scale factor), read CHECK_ROWS rows at a time."""
  rows = LatentRows(path)
  total = total_squares = 0.0
  for _, chunk in rows.chunks():
    chunk = chunk.astype(np.float64)
    total += chunk.sum()
    total_squares += np.square(chunk).sum()
  n = len(rows) * int(np.prod(rows.shape[1:]))
  variance = total_squares / n - (total / n) ** 2
  if not variance > 0:
    raise DataError(f"{path}: the latents do not vary (variance {variance}); no scale factor")
  return float(1.0 / np.sqrt(variance))


def write_info(directory: str, info: dict):
  """latents.json, written last and atomically: the set is complete when it exists."""
  _write_atomically(os.path.join(directory, INFO_FILE), json.dumps(info, indent=2))
