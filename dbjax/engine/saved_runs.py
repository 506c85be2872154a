"""What a run saves and how it comes back: the checkpoint's items (one per block, and
the shared state), the orbax RunCheckpointer of a workdir (dbjax.engine.checkpoint), and
the newest good checkpoint restored straight to where each block lives."""
import os

import jax

from dbjax.engine import parallel, state as state_lib
from dbjax.engine.placement import Placement, with_shardings


def checkpoint_targets(task, config) -> dict:
  """{item name: abstract tree} of what a run saves: one item per block and the shared
  state, when the task has one (one copy per block with parallel.mode "blocks": each
  block's copy has its own optimizer state; see engine.parallel)."""
  block, shared = state_lib.abstract_states(task)
  targets = {f"block_{b}": block for b in range(task.num_blocks)}
  if state_lib.has_shared(task):
    if config.parallel.mode == "blocks":
      shared = parallel.stacked_abstract(shared, task.num_blocks)
    targets["shared"] = shared
  return targets


def saved_shared(shared):
  """The shared state as a checkpoint holds it: None when the task shares nothing."""
  return shared if jax.tree.leaves(shared.params) else None


def _restored_shared(task, config, shared):
  """The shared state of a restored run: rebuilt empty when the task shares nothing."""
  if shared is not None:
    return shared
  empty = jax.device_get(state_lib.init_shared(task, jax.random.key(0)))
  return parallel.stack([empty] * task.num_blocks) if config.parallel.mode == "blocks" else empty


def one_shared(config, shared):
  """The shared state a trained run is evaluated with: the copies are equal after
  every average (parallel.mode "blocks"), so block 0's."""
  if config.parallel.mode == "blocks":
    return jax.tree.map(lambda x: x[0], shared)
  return shared


def checkpointer_of(task, config, workdir: str, build=None):
  """The run's RunCheckpointer; build(config) -> task (the registry's) lets it name the
  config fields behind a checkpoint that does not fit."""
  # Imported here: orbax takes a quarter of a second to import, and `import dbjax` for
  # a model alone should not pay for it.
  from dbjax.engine.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  targets_of = None if build is None else (
      lambda other: checkpoint_targets(build(other), other))
  return RunCheckpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                         task.num_blocks, config.train.max_checkpoints, targets_of=targets_of,
                         asynchronous=config.train.async_checkpoints)


def restore(task, config, checkpointer, placement: Placement | None = None):
  """(step, block states, shared state, saved metadata) of the newest readable
  checkpoint (the metadata holds the config it was saved with). With a placement the
  blocks are read straight to where they wait and the shared state to the devices,
  each host reading its own shards (a checkpoint of any mesh or host count); without
  one, as numpy."""
  targets = checkpoint_targets(task, config)
  blocks = [targets[f"block_{b}"] for b in range(task.num_blocks)]
  if isinstance(placement, parallel.BlockParallelTrainer):
    blocks = [with_shardings(t, placement.block_shardings()) for t in blocks]
    shared_shardings = placement.shared_shardings
  elif placement is not None:
    blocks = [with_shardings(t, placement.waiting) for t in blocks]
    shared_shardings = placement.shared
  if placement is not None and "shared" in targets:
    targets["shared"] = with_shardings(targets["shared"], shared_shardings)
  step, states, shared, meta = checkpointer.restore_latest_good(
      blocks, config, target_shared=targets.get("shared"))
  shared = _restored_shared(task, config, shared)
  if placement is not None:
    shared = jax.device_put(shared, shared_shardings)
  return step, states, shared, meta
