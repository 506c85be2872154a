"""Run checkpoints with orbax: one item per block, the shared state (classification)
if the run has one, and a JSON item of run metadata.

Blocks are saved from and restored to host memory (numpy), so neither saving nor
resuming ever puts more than the active block on the accelerator.

Faults:
- A kill during a save: orbax writes each step to a temporary directory and renames it
  when complete, so the previous checkpoint is untouched; leftovers are removed.
- Truncated or altered files: the metadata holds a SHA-256 of every item's arrays, so
  `restore_latest_good` notices even a flipped bit, moves the step aside (to
  <directory>_corrupt/) and falls back to the one before.
- A full disk: reported as a CheckpointError naming the step kept; the partial step is
  removed.
- A state with NaN or inf is never written.
"""
import errno
import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dbjax.errors import CheckpointError, ConfigError

# Fields that fix the shapes of the saved state: a checkpoint whose values differ
# cannot be restored into this run.
SHAPE_FIELDS = ("method", "task", "model.num_layers", "model.hidden_size", "model.num_heads",
                "model.mlp_ratio", "model.patch_size", "model.frequency_dim",
                "diffusion.num_blocks", "data.image_size", "data.channels",
                "data.num_classes")
# ... and those of a DiffusionBlocks classifier (an end-to-end ViT has neither).
CLASSIFIER_SHAPE_FIELDS = ("classifier.target_token", "classifier.shared_modules")
# ... and those of a language run (data.num_classes is then the vocabulary size).
LANGUAGE_SHAPE_FIELDS = ("language.kind", "language.seq_len")


def shape_fields(config_dict: dict) -> tuple[str, ...]:
  """The fields that fix the saved state's shapes for this kind of run."""
  task = config_dict.get("task")
  if task == "classification" and config_dict.get("method") == "diffusion_blocks":
    return SHAPE_FIELDS + CLASSIFIER_SHAPE_FIELDS
  if task == "language":
    return SHAPE_FIELDS + LANGUAGE_SHAPE_FIELDS
  return SHAPE_FIELDS


def _field(config_dict: dict, dotted: str):
  value = config_dict
  for part in dotted.split("."):
    value = value.get(part) if isinstance(value, dict) else None
  return value


def checksum(tree) -> str:
  """SHA-256 of a tree's arrays: their paths, dtypes, shapes and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


def _is_disk_full(error: BaseException | None) -> bool:
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


class RunCheckpointer:
  """Saves and restores the B block states of a run, with its config and metadata."""

  def __init__(self, directory: str, num_blocks: int, max_to_keep: int):
    self.num_blocks, self.directory = num_blocks, directory
    self._remove_partial_saves()
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True))

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
    """Write step `step`; raises CheckpointError on a full disk, keeping the last one."""
    trees = {f"block_{b}": state for b, state in enumerate(block_states)}
    if shared is not None:
      trees["shared"] = shared
    for name, tree in trees.items():
      if not _all_finite(tree):  # the train step never applies a non-finite update
        raise FloatingPointError(f"refusing to save step {step}: {name} holds NaN or inf")
    meta = dict(metadata, step=step, config=json.loads(config.to_json()),
                checksums={name: checksum(tree) for name, tree in trees.items()})
    try:
      self.manager.save(step, args=ocp.args.Composite(
          meta=ocp.args.JsonSave(meta),
          **{name: ocp.args.PyTreeSave(tree) for name, tree in trees.items()}))
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_disk_full(e):
        raise
      self._remove_partial_saves()
      self.manager.reload()
      raise CheckpointError(
          f"no space left on the device while saving step {step} to {self.directory}; "
          f"the checkpoint of step {self.manager.latest_step()} is kept: free some space "
          "and run the same command to resume") from e

  def read_metadata(self, step: int) -> dict:
    """The JSON item of `step`: run metadata and the config the run was made with."""
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, target_states, config, step=None, target_shared=None):
    """(step, states as numpy, shared state as numpy or None, metadata) of `step`
    (default: the latest).

    target_states, target_shared: this run's states, concrete or abstract
      (jax.ShapeDtypeStruct), giving structure and shapes.
    Refuses a checkpoint made with a config of other shapes, naming the field.
    """
    step = self.manager.latest_step() if step is None else step
    meta = self.read_metadata(step)
    ours = json.loads(config.to_json())
    for field in shape_fields(ours):
      if _field(meta["config"], field) != _field(ours, field):
        raise ConfigError(
            f"checkpoint at step {step} was made with config.{field}="
            f"{_field(meta['config'], field)!r}, this run has {_field(ours, field)!r}; "
            "use another workdir or the same config")
    as_numpy = lambda tree: jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    targets = {f"block_{b}": state for b, state in enumerate(target_states)}
    if target_shared is not None:
      targets["shared"] = target_shared
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        name: ocp.args.PyTreeRestore(item=target, restore_args=as_numpy(target))
        for name, target in targets.items()}))
    for name, expected in meta.get("checksums", {}).items():
      if name in targets and checksum(restored[name]) != expected:
        raise CheckpointError(f"{name} does not match the checksum saved with it")
    return (step, [restored[f"block_{b}"] for b in range(self.num_blocks)],
            restored["shared"] if target_shared is not None else None, meta)

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
        failures.append(f"step {step} ({reason})")
        aside = self._move_aside(step)
        logging.warning("checkpoint of step %d is unreadable (%s); moved it to %s and "
                        "trying the one before", step, reason, aside)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory}: " + "; ".join(failures)
        + ". Start the run again in a new workdir")

  def _move_aside(self, step: int) -> str:
    """Move a corrupt step out of orbax's sight, kept for inspection."""
    corrupt = f"{self.directory.rstrip(os.sep)}_corrupt"
    target = os.path.join(corrupt, f"{step}_{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(corrupt, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def close(self):
    """Wait for pending saves and release the manager."""
    self.manager.close()
