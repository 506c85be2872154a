"""Run checkpoints with orbax: one item per block, the shared state (classification)
if the run has one, and a JSON item of run metadata.

Blocks are saved as they are, sharded global arrays (or numpy): orbax writes each
host's own shards (OCDBT, one namespace per process), and nothing is gathered. A
restore reads into abstract targets that carry this run's shardings, so a run continues
on another device count, host count or mesh shape, each host reading its own shards.

Saves are asynchronous where config train.async_checkpoints says so (the default):
`save` returns once orbax has copied the arrays off the devices, and the files are
written, renamed into place and listed (below) in the background while training goes
on. The next `save`, `wait` and `close` wait for it, and raise its failure there. A
run that stops on a signal closes its checkpointer, so its last step is on disk before
the process exits.

Faults:
- A kill during a save: orbax writes each step to a temporary directory and renames it
  when complete, so the previous checkpoint is untouched; leftovers are removed.
- Truncated or altered files: once a step is written, each process lists the SHA-256
  of every file it wrote, and a restore checks the listings before orbax reads anything
  (dbjax.engine.file_listings). `restore_latest_good` notices even a flipped bit, moves
  the step aside (to <directory>_corrupt/) and falls back to the one before; when none
  is left, the next run says that it starts afresh and where the unreadable steps are.
- A full disk: reported as a CheckpointError naming the step kept; the partial step is
  removed.
- A state with NaN or inf is never written.

Another config is no fault: before reading any array, the saved trees (orbax metadata)
are compared with this run's, and the first path whose presence, shape or dtype
differs is a ConfigError naming it and the config fields that cause it. Such a
checkpoint is left where it is.
"""
import errno
import hashlib
import json
import os
import shutil
import threading
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dbjax.config import field_holder, flatten
from dbjax.engine import file_listings
from dbjax.errors import CheckpointError, ConfigError

# A checkpoint's step counts iterations of one block, or parallel steps of all blocks:
# the same trees can mean another schedule, so this field must match as well.
SCHEDULE_FIELD = "parallel.mode"


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def leaf_path(path) -> str:
  """A leaf's key path as "a/b/0/c", the same for a tree of arrays, abstract arrays or
  orbax array metadata (which saves named tuples as dicts)."""
  return "/".join(_key_name(k) for k in path)


def tree_signature(tree) -> dict:
  """{path: (shape, dtype)} of every leaf of a tree of arrays, abstract arrays or orbax
  array metadata (paths as leaf_path writes them)."""
  return {leaf_path(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_difference(saved: dict, expected: dict) -> str | None:
  """The first leaf, in this run's order, missing, extra or of another shape or dtype
  in `saved` than in `expected` (tree_signature dicts), in words; None if they agree."""
  for path, spec in expected.items():
    if path not in saved:
      return f"{path} is in this run's state but not in the checkpoint"
    if saved[path] != spec:
      return (f"{path} has shape {saved[path][0]} {saved[path][1]} in the checkpoint, "
              f"{spec[0]} {spec[1]} in this run")
  extra = next((path for path in saved if path not in expected), None)
  return None if extra is None else f"{extra} is in the checkpoint but not in this run's state"


def _field(config_dict: dict, dotted: str):
  return flatten(config_dict).get(dotted)


def checksum(tree) -> str:
  """SHA-256 of a tree's arrays: their paths, dtypes, shapes and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def restore_args(target):
  """orbax's reading of each leaf: into the target's sharding where it has one, else
  as numpy."""
  def leaf(t):
    sharding = getattr(t, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
      return ocp.ArrayRestoreArgs(sharding=sharding)
    return ocp.RestoreArgs(restore_type=np.ndarray)
  return jax.tree.map(leaf, target)


def _all_finite(tree) -> bool:
  """No NaN or inf in the shards this process holds (each host checks its own)."""
  def shards(leaf):
    if isinstance(leaf, jax.Array):
      return [np.asarray(s.data) for s in leaf.addressable_shards]
    return [np.asarray(leaf)]
  return all(np.all(np.isfinite(shard)) for leaf in jax.tree.leaves(tree)
             for shard in shards(leaf) if np.issubdtype(shard.dtype, np.inexact))


def _is_disk_full(error: BaseException | None) -> bool:
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


class RunCheckpointer:
  """Saves and restores the B block states of a run, with its config and metadata."""

  def __init__(self, directory: str, num_blocks: int, max_to_keep: int, targets_of=None,
               block_ids=None, remove_partial: bool = True, asynchronous: bool = False):
    """targets_of(config) -> {item name: abstract tree}: the trees a run of `config`
    saves, used only to name the config fields behind a checkpoint that does not fit.
    block_ids: the blocks whose states it holds, in order (default: all num_blocks; a
    block job's checkpoints hold its block alone, see engine.block_jobs).
    remove_partial: remove the leftovers of saves that never finished; False when
    another process may be saving there now.
    asynchronous: write in the background (see the module docstring)."""
    self.directory, self.targets_of = directory, targets_of
    self.asynchronous = asynchronous
    # The step being written in the background, its thread, and what went wrong there.
    self._pending: tuple[int, threading.Thread, list] | None = None
    self.block_ids = list(range(num_blocks) if block_ids is None else block_ids)
    if remove_partial:
      self._remove_partial_saves()
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, create=True))

  def _remove_partial_saves(self):
    """Temporary directories of saves that never finished (a kill, a full disk)."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def latest_step(self):
    """The newest saved step, or None when there is no checkpoint."""
    return self.manager.latest_step()

  def save(self, step: int, block_states, config, metadata: dict, shared=None):
    """Write step `step` (in the background when asynchronous: see `wait`); raises
    CheckpointError on a full disk, keeping the last complete step."""
    self.wait()
    trees = {f"block_{b}": state for b, state in zip(self.block_ids, block_states)}
    if shared is not None:
      trees["shared"] = shared
    for name, tree in trees.items():
      if not _all_finite(tree):  # the train step never applies a non-finite update
        raise FloatingPointError(f"refusing to save step {step}: {name} holds NaN or inf")
    meta = dict(metadata, step=step, config=json.loads(config.to_json()))
    try:
      # Returns once the arrays are copied off the devices (asynchronous) or written.
      self.manager.save(step, args=ocp.args.Composite(
          meta=ocp.args.JsonSave(meta),
          **{name: ocp.args.PyTreeSave(tree) for name, tree in trees.items()}))
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_disk_full(e, step)
      raise
    errors = []
    thread = threading.Thread(target=self._finish, args=(step, errors),
                              name=f"dbjax-checkpoint-{step}")
    self._pending = (step, thread, errors)
    if self.asynchronous:
      thread.start()
    else:
      thread.run()
      self.wait()

  def _finish(self, step: int, errors: list):
    """Wait for orbax to write and rename step `step`, then list the files this process
    wrote; a failure is kept in `errors` for `wait` to raise."""
    try:
      self.manager.wait_until_finished()
      file_listings.write(os.path.join(self.directory, str(step)))
    except BaseException as e:  # pylint: disable=broad-except  # raised again by `wait`
      errors.append(e)

  def wait(self):
    """Block until the step saved last is written and listed; raise what went wrong
    there (a CheckpointError for a full disk, naming the step kept)."""
    if self._pending is None:
      return
    step, thread, errors = self._pending
    if thread.is_alive():
      thread.join()
    self._pending = None
    if errors:
      self._raise_if_disk_full(errors[0], step)
      raise errors[0]

  def _raise_if_disk_full(self, error: BaseException, step: int):
    """CheckpointError naming the step kept when `error` is a full disk; the partial
    step is removed."""
    if not _is_disk_full(error):
      return
    self._remove_partial_saves()
    self.manager.reload()
    raise CheckpointError(
        f"no space left on the device while saving checkpoint {step} to {self.directory}; "
        f"checkpoint {self.manager.latest_step()} is kept: free some space "
        "and run the same command to resume") from error

  def read_metadata(self, step: int) -> dict:
    """The JSON item of `step`: run metadata and the config the run was made with."""
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, target_states, config, step=None, target_shared=None):
    """(step, states, shared state or None, metadata) of `step` (default: the
    latest).

    target_states, target_shared: this run's states, concrete or abstract
      (jax.ShapeDtypeStruct), giving structure and shapes; abstract leaves that carry
      a sharding are read as global arrays with it (each host its own shards), the
      others as numpy.
    Refuses (ConfigError, nothing moved) a checkpoint whose trees differ from the
    targets', naming the first differing path and the config fields behind it.
    """
    step = self.manager.latest_step() if step is None else step
    file_listings.check_on_every_host(os.path.join(self.directory, str(step)))
    meta = self.read_metadata(step)
    targets = {f"block_{b}": state for b, state in zip(self.block_ids, target_states)}
    if target_shared is not None:
      targets["shared"] = target_shared
    self._check_fits(step, meta, targets, config)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        name: ocp.args.PyTreeRestore(item=target, restore_args=restore_args(target))
        for name, target in targets.items()}))
    # Steps saved before the per-host file listings carry whole-array checksums.
    for name, expected in meta.get("checksums", {}).items():
      if name in targets and checksum(jax.device_get(restored[name])) != expected:
        raise CheckpointError(f"{name} does not match the checksum saved with it")
    return (step, [restored[f"block_{b}"] for b in self.block_ids],
            restored["shared"] if target_shared is not None else None, meta)

  def saved_signatures(self, step: int) -> dict:
    """{item: tree_signature} of every tree saved at `step`, from orbax's metadata
    (no array is read)."""
    step_dir = os.path.join(self.directory, str(step))
    handler = ocp.PyTreeCheckpointHandler()
    return {name: tree_signature(handler.metadata(epath.Path(step_dir) / name).tree)
            for name in sorted(os.listdir(step_dir))
            if name.startswith("block_") or name == "shared"}

  def _check_fits(self, step: int, meta: dict, targets: dict, config):
    """ConfigError unless the checkpoint at `step` holds exactly the trees of `targets`
    (structure, shapes, dtypes) under the same schedule."""
    ours = json.loads(config.to_json())
    saved_config = meta.get("config", {})
    where = f"the checkpoint of step {step} in {self.directory}"
    if _field(saved_config, SCHEDULE_FIELD) not in (None, _field(ours, SCHEDULE_FIELD)):
      raise ConfigError(
          f"{where} was trained with config.{SCHEDULE_FIELD}="
          f"{_field(saved_config, SCHEDULE_FIELD)!r}, this run has "
          f"{_field(ours, SCHEDULE_FIELD)!r} (its steps would mean another schedule); "
          "use the saved config or another workdir")
    saved = self.saved_signatures(step)
    expected = {name: tree_signature(tree) for name, tree in targets.items()}
    problem = next((f"the checkpoint has no {name}" for name in expected if name not in saved),
                   None) or next((f"the checkpoint holds {name}, which this run lacks"
                                  for name in saved if name not in expected), None)
    if problem is None:
      problem = next((f"{name}/{difference}" for name in expected
                      if (difference := first_difference(saved[name], expected[name]))),
                     None)
    if problem is None:
      return
    causes = self._causes(saved_config, ours, expected)
    raise ConfigError(
        f"{where} does not fit this run: {problem}"
        + (f"; caused by {causes}" if causes else "")
        + "; use the saved config or another workdir (the checkpoints are left as they are)")

  def _causes(self, saved_config: dict, ours: dict, expected: dict) -> str:
    """The config fields that differ from the saved run's and change the state's trees:
    each alone set back to its saved value changes this run's tree signatures `expected`
    (found with self.targets_of; every differing field when that is not given)."""
    saved_flat, our_flat = flatten(saved_config), flatten(ours)
    differing = [f for f in our_flat if f in saved_flat and saved_flat[f] != our_flat[f]]
    if self.targets_of is not None:
      differing = [f for f in differing
                   if self._changes_trees(ours, f, saved_flat[f], expected)]
    return ", ".join(f"config.{f}={our_flat[f]!r} (the checkpoint's: {saved_flat[f]!r})"
                     for f in differing)

  def _changes_trees(self, ours: dict, field: str, value, expected: dict) -> bool:
    config = ml_collections.ConfigDict(ours)
    holder, name = field_holder(config, field)
    try:
      holder[name] = type(holder[name])(value) if value is not None else value
      targets = self.targets_of(config)
    except Exception:  # pylint: disable=broad-except  # not a valid config on its own
      return False
    return {n: tree_signature(t) for n, t in targets.items()} != expected

  def restore_latest_good(self, target_states, config, target_shared=None):
    """`restore` of the newest step that reads back intact. A truncated or altered
    step is logged, moved to <directory>_corrupt/ and the one before is tried; a
    checkpoint of another config is refused (ConfigError) without trying others."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(target_states, config, step, target_shared)
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        failures.append(f"checkpoint {step} ({reason})")
        aside = self._move_aside(step)
        logging.warning("checkpoint %d is unreadable (%s); moved it to %s and trying the "
                        "one before", step, reason, aside)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory}: " + "; ".join(failures)
        + f"; they are kept in {self.corrupt_directory}. Run the same command to start "
        "afresh from iteration 0, or another workdir")

  @property
  def corrupt_directory(self) -> str:
    """Where unreadable steps are moved, kept for inspection."""
    return f"{self.directory.rstrip(os.sep)}_corrupt"

  def set_aside(self) -> list[str]:
    """The steps moved to corrupt_directory, oldest first."""
    if not os.path.isdir(self.corrupt_directory):
      return []
    return sorted(os.listdir(self.corrupt_directory),
                  key=lambda name: os.path.getmtime(os.path.join(self.corrupt_directory, name)))

  def _move_aside(self, step: int) -> str:
    """Move a corrupt step out of orbax's sight, kept for inspection."""
    corrupt = self.corrupt_directory
    target = os.path.join(corrupt, f"{step}_{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(corrupt, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def close(self):
    """Wait for the pending save (raising its failure) and release the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()
