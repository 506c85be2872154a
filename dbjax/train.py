"""The training driver: train_and_evaluate(config, workdir), which the CLI, the notebook
and the tests all call.

Schedule (paper, Sec. 4): every iteration draws one block uniformly at random and
trains it on the whole batch; DiffusionBlocks runs B times as many iterations as
end-to-end training, so both spend the same layer evaluations.

Memory: all blocks' states live in host memory as numpy; only the block being trained
is on the accelerator. Because blocks share nothing, the iterations of a checkpoint
interval are regrouped by block (each block still sees its own iterations in order,
with the batch and key of that iteration), which gives exactly the parameters of the
interleaved order while moving each block to the device once per interval, not once
per iteration. (This holds only while blocks share no trained parameters, as for
images; a jointly trained label or token embedding would couple them and need the
interleaved order.)

Determinism: the block, the batch and the key of iteration `step` are pure functions
of (seed, step), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dbjax import blocks, config as config_lib, data as data_lib, evaluation, plots, sampling
from dbjax.checkpoint import RunCheckpointer
from dbjax.errors import NonFiniteLossError, WorkdirError

METRICS_FILE = "train_metrics.jsonl"


def block_for_step(seed: int, step: int, num_blocks: int) -> int:
  """The block trained at iteration `step`: uniform, derived from (seed, step)."""
  return int(np.random.default_rng([seed, step, 1]).integers(num_blocks))


def step_key(seed: int, step: int, block_index: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), block_index)


def prepare_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def _read_history(path: str, before_step: int) -> list[dict]:
  """Metric rows of earlier iterations; rows past the checkpoint are dropped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r["step"] < before_step]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def _train_block_steps(step_fn, state, model, block_index, steps, train_data, config, bar):
  """Run one block (already on device) through its iterations; return state, metrics."""
  metrics = []
  interval = jnp.asarray(model.intervals[block_index])
  for step in steps:
    index = data_lib.batch_indices(config.seed, int(step), len(train_data.labels),
                                   config.train.batch_size)
    state, step_metrics = step_fn(state, train_data.images[index], train_data.labels[index],
                                  step_key(config.seed, int(step), block_index), interval)
    metrics.append(step_metrics)
    bar.update(1)
  return state, jax.device_get(metrics)


def _train_interval(step_fn, states, model, chunk, train_data, config, bar) -> list[dict]:
  """Train the iterations in `chunk`, regrouped by block; update the host `states` in
  place and return the metric rows in iteration order."""
  schedule = np.array([block_for_step(config.seed, s, model.num_blocks) for s in chunk])
  rows = []
  for b in range(model.num_blocks):
    own_steps = chunk[schedule == b]
    if len(own_steps) == 0:
      continue
    state, metrics = _train_block_steps(step_fn, jax.device_put(states[b]), model, b,
                                        own_steps, train_data, config, bar)
    for step, m in zip(own_steps, metrics):
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(int(step), b, float(m["loss"]))
      rows.append({"step": int(step), "block": b, "loss": float(m["loss"]),
                   "grad_norm": float(m["grad_norm"])})
    states[b] = jax.device_get(state)  # back to host: the device holds one block
    del state  # free its device buffers before the next block is put there
  return sorted(rows, key=lambda r: r["step"])


def train(config, workdir: str, train_data: data_lib.ImageData | None = None):
  """Train (or resume) the run in `workdir`; return (model, host block states, history).

  Raises NonFiniteLossError, naming step and block, if a loss becomes NaN or inf; the
  last good checkpoint stays in place.
  """
  config_lib.validate(config)
  prepare_workdir(workdir)
  if train_data is None:
    train_data = data_lib.load_images(config.data.name, "train", config.data.data_dir)
  data_lib.check_images(train_data.images, train_data.labels, config.data.image_size,
                        config.data.channels, config.data.num_classes, "training images")
  model = blocks.build(config)
  checkpointer = RunCheckpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 model.num_blocks, config.train.max_checkpoints)
  if checkpointer.latest_step() is None:
    start, states = 0, blocks.init_blocks_on_host(model, config.seed)
  else:
    start, states, _ = checkpointer.restore(
        [blocks.abstract_block_state(model)] * model.num_blocks, config)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  history = _read_history(metrics_path, start)

  total = config_lib.total_iterations(config)
  step_fn = blocks.jit_train_step(model)
  bar = tqdm(total=total, initial=start, desc=f"training {config.method}",
             disable=not config.train.progress, unit="it")
  try:
    for chunk_start in range(start, total, config.train.checkpoint_every):
      chunk = np.arange(chunk_start, min(total, chunk_start + config.train.checkpoint_every))
      rows = _train_interval(step_fn, states, model, chunk, train_data, config, bar)
      with open(metrics_path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      history += rows
      checkpointer.save(int(chunk[-1]) + 1, states, config, {"iterations": total})
      bar.set_postfix(loss=f"{np.mean([r['loss'] for r in rows]):.4f}")
  finally:
    bar.close()
    checkpointer.close()
  return model, states, history


def restore_run(workdir: str, config=None):
  """(config, model, host states) of the latest checkpoint in `workdir`.

  The config saved with the checkpoint is used unless one is given.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise WorkdirError(f"no checkpoints in {workdir!r}: train a run there first")
  if config is None:
    probe = RunCheckpointer(directory, 1, 1)
    step = probe.latest_step()
    if step is None:
      raise WorkdirError(f"no complete checkpoint in {directory!r}")
    meta = probe.read_metadata(step)
    probe.close()
    config = config_lib.default_config()
    config.update_from_flattened_dict(_flatten(meta["config"]))
  model = blocks.build(config_lib.validate(config))
  checkpointer = RunCheckpointer(directory, model.num_blocks, config.train.max_checkpoints)
  _, states, _ = checkpointer.restore([blocks.abstract_block_state(model)] * model.num_blocks,
                                      config)
  checkpointer.close()
  return config, model, states


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def grid_labels(config) -> np.ndarray:
  """Labels of the sample grid: each row one class in turn."""
  n = config.sample.grid_size
  return np.repeat(np.arange(n) % config.data.num_classes, n).astype(np.int32)


def generate_and_evaluate(config, workdir: str, model, states, test_data=None,
                          train_data=None, grid_name: str = "samples.png") -> dict:
  """Sample grid PNG <workdir>/<grid_name> and, if config.eval.enabled, Frechet distance
  metrics."""
  stacked = sampling.stack_params([s.params for s in states])
  key = jax.random.fold_in(jax.random.key(config.seed), 10**9)
  s = config.sample
  grid = sampling.sample_in_batches(model, stacked, key, grid_labels(config), s.num_steps,
                                    s.solver, s.guidance_scale, batch_size=s.grid_size**2)
  plots.save_image_grid(grid, os.path.join(workdir, grid_name), rows=s.grid_size)
  results = {"sample_steps": s.num_steps, "solver": s.solver,
             "guidance_scale": s.guidance_scale}
  if not config.eval.enabled:
    return results
  if train_data is None:
    train_data = data_lib.load_images(config.data.name, "train", config.data.data_dir)
  if test_data is None:
    test_data = data_lib.load_images(config.data.name, "test", config.data.data_dir)
  net = evaluation.load_or_train_feature_net(
      config.data.name, train_data, config.eval.classifier_steps, config.eval.cache_dir,
      progress=config.train.progress)
  labels = np.arange(config.eval.num_samples, dtype=np.int32) % config.data.num_classes
  start = time.perf_counter()
  samples = sampling.sample_in_batches(model, stacked, jax.random.fold_in(key, 1), labels,
                                       s.num_steps, s.solver, s.guidance_scale,
                                       progress=config.train.progress)
  results["samples_per_second"] = len(labels) / (time.perf_counter() - start)
  results.update(evaluation.evaluate_samples(net, samples, labels, test_data))
  return results


def final_losses(history: list[dict], num_blocks: int, window: int = 20) -> dict:
  """Mean loss of each block's last `window` iterations (None if it never trained)."""
  losses = {b: [r["loss"] for r in history if r["block"] == b][-window:]
            for b in range(num_blocks)}
  return {b: float(np.mean(v)) if v else None for b, v in losses.items()}


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (resuming if possible), then write samples.png, loss_curves.png and
  metrics.json to `workdir`; return the metrics."""
  start = time.perf_counter()
  config_lib.validate(config)
  train_data = data_lib.load_images(config.data.name, "train", config.data.data_dir)
  model, states, history = train(config, workdir, train_data)
  train_seconds = time.perf_counter() - start
  plots.save_loss_curves(history, model.num_blocks, os.path.join(workdir, "loss_curves.png"),
                         title=f"{config.method}, {config.data.name}")
  results = {"method": config.method, "num_blocks": model.num_blocks,
             "iterations": config_lib.total_iterations(config),
             "train_seconds_this_session": train_seconds,
             "final_loss_per_block": final_losses(history, model.num_blocks)}
  results.update(generate_and_evaluate(config, workdir, model, states, train_data=train_data))
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
