"""Run checkpoints with orbax: one item per block, the shared state (classification)
if the run has one, and a JSON item of run metadata.

Blocks are saved from and restored to host memory (numpy), so neither saving nor
resuming ever puts more than the active block on the accelerator. Orbax writes each
step to a temporary directory and renames it when complete, so a run killed during a
save still has its previous checkpoint.
"""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from dbjax.errors import ConfigError

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


class RunCheckpointer:
  """Saves and restores the B block states of a run, with its config and metadata."""

  def __init__(self, directory: str, num_blocks: int, max_to_keep: int):
    self.num_blocks = num_blocks
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, block_states, config, metadata: dict, shared=None):
    items = {f"block_{b}": ocp.args.PyTreeSave(state) for b, state in enumerate(block_states)}
    if shared is not None:
      items["shared"] = ocp.args.PyTreeSave(shared)
    meta = dict(metadata, step=step, config=json.loads(config.to_json()))
    self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))
    self.manager.wait_until_finished()

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
    return (step, [restored[f"block_{b}"] for b in range(self.num_blocks)],
            restored["shared"] if target_shared is not None else None, meta)

  def close(self):
    self.manager.close()
