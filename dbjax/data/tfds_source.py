"""A tfds data set by name, as a random-access source (tfds.data_source: array_record
files, no TensorFlow), with one-line errors and no long wait on a machine offline.

tfds downloads a data set that is not in its data_dir; with no network its downloader
retries each file for minutes and leaves partial folders behind. So the prepared copy is
tried first; only when there is none is the network probed (a few seconds at most), and
an offline machine gets one DataError saying how to bring the data set over.
"""
import socket
import threading

import numpy as np

from dbjax.errors import DataError, nearest
from dbjax.progress import progress_bar

# Where tfds keeps its prepared data sets and most download mirrors (tfds's GCS bucket).
PROBE_HOST, PROBE_PORT, PROBE_SECONDS = "storage.googleapis.com", 443, 4.0
# A split of at least this many rows shows a bar while its labels are read.
LABELS_BAR_ROWS = 100_000


def network_unreachable(host: str = PROBE_HOST, port: int = PROBE_PORT,
                        seconds: float = PROBE_SECONDS) -> str | None:
  """Why `host` cannot be reached, in words, or None when it can; at most `seconds`
  (name resolution has no timeout of its own, so the probe runs in a thread)."""
  outcome = ["no answer within %.0f s" % seconds]

  def connect():
    try:
      socket.create_connection((host, port), timeout=seconds).close()
      outcome[0] = None
    except OSError as e:
      outcome[0] = e.strerror or str(e)
  probe = threading.Thread(target=connect, daemon=True)
  probe.start()
  probe.join(seconds)
  return outcome[0]


def _first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def data_source(name: str, split: str, data_dir: str = "", decoders=None):
  """tfds.data_source(name, split) from data_dir ("" = tfds's default), downloading
  only when the data set is not there and the network answers; DataError otherwise.
  `decoders` are tfds's (tfds.decode.SkipDecoding() for a feature read as bytes)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "tfds's default data_dir (~/tensorflow_datasets)"
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                            decoders=decoders)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"config.data.name='tfds:{name}': tfds has no data set {name!r}"
                    f"{nearest(name, tfds.list_builders(with_community_datasets=False))}") from e
  except Exception as e:  # pylint: disable=broad-except  # not prepared, or a bad split
    not_prepared = e
  reason = network_unreachable()
  if reason is not None:
    raise DataError(
        f"tfds data set {name!r} is not in {where} and {PROBE_HOST} cannot be reached "
        f"({reason}): prepare it where there is a network (tfds build {name} "
        f"--file_format=array_record) and copy it into config.data.data_dir") from not_prepared
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, decoders=decoders)
  except Exception as e:  # tfds raises many types: no network, bad split, ...
    raise DataError(f"tfds data set {name!r} (split {split!r}) could not be loaded: "
                    f"{_first_line(e)}") from e


def read_labels(name: str, split: str, data_dir: str, decoded_source) -> np.ndarray:
  """The labels of a split, int32, in one pass over its records that decodes no image
  (the image read as its bytes, tfds.decode.SkipDecoding): for ImageNet, 1.28 M labels
  without decoding 1.28 M JPEGs. Reading a label alone would need TensorFlow."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = data_source(name, split, data_dir, decoders={"image": tfds.decode.SkipDecoding()})
  try:
    source[0]  # pylint: disable=pointless-statement
  except ModuleNotFoundError:
    # tfds.testing.mock_data makes its examples by encoding them, with TensorFlow, when
    # decoders are given: there the images are random arrays, cheap to decode.
    source = decoded_source
  with progress_bar(total=len(source), desc=f"tfds:{name} ({split}) labels", unit="row",
                    leave=False, disable=len(source) < LABELS_BAR_ROWS) as bar:
    labels = np.empty(len(source), np.int32)
    for i in range(len(source)):
      labels[i] = source[i]["label"]
      bar.update()
  return labels
