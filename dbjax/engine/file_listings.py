"""A checkpoint step's file listings: each process's SHA-256 of the files it wrote,
checked before a restore reads anything.

Once a step is written, each process writes <step>/file_checksums.<process>.json, a
SHA-256 of every file it wrote (its OCDBT namespace; process 0 also the metadata), so a
host hashes its own shards, never the whole model. A restore checks them before orbax
reads anything (orbax's reader, handed a truncated file, fails in background threads
that print pages of tracebacks), each host its share of the listings, and the hosts
agree on the verdict. A step whose process was killed after orbax renamed it and before
the listing was written has no listing, and is read unchecked, as steps saved before
listings were.
"""
import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from dbjax.errors import CheckpointError

# The listings' names: file_checksums.<process>.json.
FILE_CHECKSUMS_STEM = "file_checksums"


def writer_of(relative_path: str) -> int:
  """The process that wrote a file of a step: its OCDBT namespace's (ocdbt.process_<i>),
  process 0 for the rest (metadata, the merged manifest)."""
  for part in relative_path.split(os.sep):
    if part.startswith("ocdbt.process_"):
      return int(part.rsplit("_", 1)[1])
  return 0


def file_checksums(directory: str, process: int | None = None) -> dict:
  """{path relative to `directory`: SHA-256 of its bytes} of every file below it that
  `process` wrote (writer_of; None: every file)."""
  digests = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if name.startswith(FILE_CHECKSUMS_STEM) or (
          process is not None and writer_of(relative) != process):
        continue  # the listings themselves, whole or partial; other processes' files
      with open(path, "rb") as f:
        digests[relative] = hashlib.file_digest(f, "sha256").hexdigest()
  return digests


def listings(directory: str) -> list[str]:
  """The checksum listings of a step, whole ones only, in process order."""
  return sorted(n for n in os.listdir(directory)
                if n.startswith(FILE_CHECKSUMS_STEM) and n.endswith(".json"))


def check(directory: str, share: tuple[int, int] = (0, 1)):
  """CheckpointError naming the first file of a step directory that is missing or
  differs from the checksum written with it (steps saved without checksums pass).
  share (k, n): check listings k, k + n, ... (each of n hosts its share)."""
  first, every = share
  for listing in listings(directory)[first::every]:
    with open(os.path.join(directory, listing)) as f:
      expected = json.load(f)
    for name, digest in expected.items():
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{name} is missing (listed in {listing})")
      with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != digest:
          raise CheckpointError(f"{name} is changed (its SHA-256 differs from the one "
                                "written with it)")


def check_on_every_host(directory: str):
  """`check` with the listings shared out over the processes, and one verdict for
  all: any host's failure is a CheckpointError on every host."""
  if jax.process_count() == 1:
    return check(directory)
  problem = ""
  try:
    check(directory, (jax.process_index(), jax.process_count()))
  except CheckpointError as e:
    problem = str(e)
  failed = multihost_utils.process_allgather(np.array([bool(problem)]))
  if problem:
    raise CheckpointError(problem)
  if np.any(failed):
    raise CheckpointError("another host found a file of this step changed or missing")


def write(step_dir: str):
  """<step_dir>/file_checksums.<process>.json of the files this process wrote, whole or
  not at all (a rename)."""
  name = f"{FILE_CHECKSUMS_STEM}.{jax.process_index()}"
  partial = os.path.join(step_dir, name + ".partial")
  with open(partial, "w") as f:
    json.dump(file_checksums(step_dir, jax.process_index()), f)
  os.replace(partial, os.path.join(step_dir, name + ".json"))
