"""The training driver: train_and_evaluate(config, workdir), which the CLI, the notebook
and the tests all call, for both tasks (config.task: image generation with DiT blocks,
dbjax.blocks; classification with ViT blocks, dbjax.classify).

Schedule (paper, Sec. 4): every iteration draws one block uniformly at random and
trains it on the whole batch; DiffusionBlocks runs B times as many iterations as
end-to-end training, so both spend the same layer evaluations.

Memory: all blocks' states live in host memory as numpy; only the block being trained
(and the small shared state of a classification run) is on the accelerator. When blocks
share no trained parameters (images; classification with a frozen label embedding and
per-block modules) the iterations of a checkpoint interval are regrouped by block: each
block still sees its own iterations in order, with the batch and key of that
iteration, which gives exactly the parameters of the interleaved order while moving
each block to the device once per interval. When they share trained parameters the
interleaved order is kept, and a block moves only when the next iteration's block
differs.

Determinism: the block, the batch and the key of iteration `step` are pure functions
of (seed, step), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would.
"""
import functools
import json
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from dbjax import (blocks, classify, config as config_lib, data as data_lib, evaluation,
                   language, parallel, plots, sampling, text)
from dbjax.checkpoint import RunCheckpointer
from dbjax.errors import NonFiniteLossError, TrainingInterrupted, WorkdirError
from dbjax.metric_log import MetricLog, flatten

METRICS_FILE = "train_metrics.jsonl"


def block_for_step(seed: int, step: int, num_blocks: int) -> int:
  """The block trained at iteration `step`: uniform, derived from (seed, step)."""
  return int(np.random.default_rng([seed, step, 1]).integers(num_blocks))


def step_key(seed: int, step: int, block_index: int) -> jax.Array:
  """The PRNG key of iteration `step`, trained by block `block_index`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), block_index)


def prepare_workdir(workdir: str):
  """Create the workdir and check that it is writable (WorkdirError if not)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # Per process: the hosts of a multi-host run probe the same shared workdir.
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
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


def task_module(config):
  """The module that builds and steps the run's blocks: dbjax.blocks, dbjax.classify or
  dbjax.language.

  Both offer build(config), init_on_host(model, seed) -> (block states, shared state),
  abstract_states(model) and jit_run_step(model), a step
  (state, shared, *batch, key, interval) -> (state, shared, metrics), where batch is
  (images, labels), or (tokens,) for language.
  """
  return {"classification": classify, "language": language}.get(config.task, blocks)


def load_train_data(config):
  """The training split, checked against the config: ImageData, or TextData for language
  (with the config's data.num_classes set to its vocabulary size)."""
  if config.task == "language":
    train_data, _ = language.load_data(config)
    return language.with_vocabulary(config, train_data.vocabulary), train_data
  train_data = data_lib.load_images(config.data.name, "train", config.data.data_dir)
  _check_training_images(config, train_data)
  return config, train_data


def _check_training_images(config, train_data: data_lib.ImageData):
  data_lib.check_images(train_data.images, train_data.labels, config.data.image_size,
                        config.data.channels, config.data.num_classes, "training images")


def block_runs(chunk: np.ndarray, schedule: np.ndarray, couples_blocks: bool):
  """[(block, its iterations)] in the order they are trained (see the module docstring):
  regrouped by block when blocks are independent, interleaved when they are coupled."""
  order = np.arange(len(chunk)) if couples_blocks else np.argsort(schedule, kind="stable")
  runs = []
  for i in order:
    if runs and runs[-1][0] == schedule[i]:
      runs[-1][1].append(chunk[i])
    else:
      runs.append((int(schedule[i]), [chunk[i]]))
  return [(b, np.array(steps)) for b, steps in runs]


def _train_block_steps(step_fn, state, shared, model, block_index, steps, train_data, config,
                       bar):
  """Run one block (already on device) through its iterations; return state, shared
  state and the metrics."""
  metrics = []
  interval = jnp.asarray(model.intervals[block_index])
  for step in steps:
    index = data_lib.batch_indices(config.seed, int(step), train_data.num_examples,
                                   config.train.batch_size)
    state, shared, step_metrics = step_fn(
        state, shared, *train_data.batch(index), step_key(config.seed, int(step), block_index),
        interval)
    metrics.append(step_metrics)
    bar.update(1)
  return state, shared, jax.device_get(metrics)


def _train_interval(step_fn, states, shared, model, chunk, train_data, config, bar):
  """Train the iterations in `chunk`; update the host `states` in place and return
  (metric rows in iteration order, the shared state in host memory)."""
  schedule = np.array([block_for_step(config.seed, s, model.num_blocks) for s in chunk])
  rows = []
  shared = jax.device_put(shared)  # small; stays on the device through the interval
  for b, own_steps in block_runs(chunk, schedule, model.couples_blocks):
    state, shared, metrics = _train_block_steps(step_fn, jax.device_put(states[b]), shared,
                                                model, b, own_steps, train_data, config, bar)
    for step, m in zip(own_steps, metrics):
      rows.append({"step": int(step), "block": b, **{k: float(v) for k, v in m.items()}})
    states[b] = jax.device_get(state)  # back to host: the device holds one block
    del state  # free its device buffers before the next block is put there
  return sorted(rows, key=lambda r: r["step"]), jax.device_get(shared)


class TrainedRun(NamedTuple):
  model: Any                 # blocks.BlockModel or classify.ClassifierModel
  states: list               # each block's BlockState, in host memory
  shared: Any                # the shared BlockState (classification), or None
  history: list[dict]        # one metrics row per iteration


def _skipped_steps(rows: list[dict], policy: str) -> list[dict]:
  """The rows whose update was skipped for a NaN or inf. policy "stop" (config
  train.on_nonfinite) raises NonFiniteLossError for the first, before any checkpoint
  could hold what followed it."""
  skipped = [r for r in rows if r["skipped"]]
  if skipped and policy == "stop":
    first = skipped[0]
    raise NonFiniteLossError(first["step"], first["block"], first["loss"], first["grad_norm"])
  for r in skipped:
    logging.warning("skipped the update of block %d at step %d: loss %s, gradient norm %s",
                    r["block"], r["step"], r["loss"], r["grad_norm"])
  return skipped


class _StopOnSigterm:
  """Within it, SIGTERM (how schedulers preempt a job) sets `.signal_name` instead of
  killing the process, so the driver can checkpoint and stop. Only the main thread can
  take signals; elsewhere this does nothing."""

  def __init__(self):
    self.signal_name = None

  def __enter__(self):
    self._installed = threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, _):
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *_):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)


def _saved_shared_target(config, model, shared_target):
  """The checkpoint's shared state: one, or one copy per block with parallel.mode
  "blocks" (each block's copy has its own optimizer state; see dbjax.parallel)."""
  if config.parallel.mode == "blocks" and shared_target is not None:
    return parallel.stacked_abstract(shared_target, model.num_blocks)
  return shared_target


def checkpoint_targets(config) -> dict:
  """{item name: abstract tree} of what a run of `config` saves: one item per block and
  the shared state, if any."""
  task = task_module(config_lib.validate(config))
  model = task.build(config)
  block, shared = task.abstract_states(model)
  targets = {f"block_{b}": block for b in range(model.num_blocks)}
  shared = _saved_shared_target(config, model, shared)
  if shared is not None:
    targets["shared"] = shared
  return targets


def _one_shared(config, shared):
  """The shared state a trained run is evaluated with: the copies are equal after
  every average (parallel.mode "blocks"), so block 0's."""
  if config.parallel.mode == "blocks" and shared is not None:
    return jax.tree.map(lambda x: x[0], shared)
  return shared


def train(config, workdir: str, train_data=None, devices=None) -> TrainedRun:
  """Train (or resume) the run in `workdir`.

  train_data: the training split (default: loaded by `load_train_data`). A language
  run's config must then already carry its vocabulary size (language.with_vocabulary).
  devices: those a parallel.mode="blocks" run may use (default: all).
  Raises NonFiniteLossError, naming step and block, if a loss becomes NaN or inf; the
  last good checkpoint stays in place. On many hosts every process calls it; only
  process 0 writes the metrics file.
  """
  config_lib.validate(config)
  prepare_workdir(workdir)
  if train_data is None:
    config, train_data = load_train_data(config)
  elif isinstance(train_data, data_lib.ImageData):
    _check_training_images(config, train_data)
  chief = jax.process_index() == 0
  if isinstance(train_data, text.TextData) and chief:
    train_data.vocabulary.save(os.path.join(workdir, text.VOCABULARY_FILE))
  task = task_module(config)
  model = task.build(config)
  in_parallel = config.parallel.mode == "blocks"
  checkpointer = RunCheckpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 model.num_blocks, config.train.max_checkpoints,
                                 targets_of=checkpoint_targets)
  if checkpointer.latest_step() is None:
    init = functools.partial(parallel.init_on_host, task) if in_parallel else task.init_on_host
    start, (states, shared) = 0, init(model, config.seed)
  else:
    block_target, shared_target = task.abstract_states(model)
    start, states, shared, _ = checkpointer.restore_latest_good(
        [block_target] * model.num_blocks, config,
        target_shared=_saved_shared_target(config, model, shared_target))
    if chief:
      print(f"resuming from the checkpoint of step {start} in {workdir}", flush=True)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  history = _read_history(metrics_path, start) if chief else []
  num_skipped = sum(r.get("skipped", 0) for r in history)

  if in_parallel:  # train.num_steps steps, each of all B blocks at once
    total = config.train.num_steps
    trainer = parallel.BlockParallelTrainer(task, model, config, train_data, states, shared,
                                            devices)
    def train_chunk(chunk, states, shared, stop):
      del states, shared  # the trainer holds them on the devices
      rows = trainer.train(chunk, bar, should_stop=lambda: stop.signal_name is not None)
      return (rows, *trainer.host_states())
  else:  # total_iterations iterations of one block each
    total = config_lib.total_iterations(config)
    step_fn = task.jit_run_step(model)
    def train_chunk(chunk, states, shared, stop):
      # Regrouped by block, a part of the interval is no prefix of the iterations:
      # a stop request is served at its end.
      del stop
      rows, shared = _train_interval(step_fn, states, shared, model, chunk, train_data,
                                     config, bar)
      return rows, states, shared
  log = MetricLog(workdir, METRICS_FILE, enabled=chief)
  bar = tqdm(total=total, initial=start, desc=f"training {config.method}",
             disable=not (config.train.progress and chief),
             unit="step" if in_parallel else "it")
  try:
    with _StopOnSigterm() as stop:
      for chunk_start in range(start, total, config.train.checkpoint_every):
        chunk = np.arange(chunk_start, min(total, chunk_start + config.train.checkpoint_every))
        rows, states, shared = train_chunk(chunk, states, shared, stop)
        num_skipped += len(_skipped_steps(rows, config.train.on_nonfinite))
        log.write_rows(rows)
        history += rows
        done = max(r["step"] for r in rows) + 1  # all iterations before it are done
        checkpointer.save(done, states, config, {"iterations": total}, shared)
        log.print_interval(done, total, rows)
        bar.set_postfix(loss=f"{np.nanmean([r['loss'] for r in rows]):.4g}",
                        **({"skipped": num_skipped} if num_skipped else {}))
        if stop.signal_name is not None:
          raise TrainingInterrupted(stop.signal_name, done, workdir)
  finally:
    bar.close()
    checkpointer.close()
    log.close()
  return TrainedRun(model, states, _one_shared(config, shared), history)


def restore_run(workdir: str, config=None):
  """(config, model, host block states, host shared state or None) of the latest
  checkpoint in `workdir`.

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
    config.update_from_flattened_dict(flatten(meta["config"]))
  task = task_module(config_lib.validate(config))
  model = task.build(config)
  block_target, shared_target = task.abstract_states(model)
  checkpointer = RunCheckpointer(directory, model.num_blocks, config.train.max_checkpoints)
  _, states, shared, _ = checkpointer.restore_latest_good(
      [block_target] * model.num_blocks, config,
      target_shared=_saved_shared_target(config, model, shared_target))
  checkpointer.close()
  return config, model, states, _one_shared(config, shared)


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
  """Mean loss of each block's last `window` applied iterations (None if none)."""
  losses = {b: [r["loss"] for r in history if r["block"] == b and not r.get("skipped")][-window:]
            for b in range(num_blocks)}
  return {b: float(np.mean(v)) if v else None for b, v in losses.items()}


def classify_and_evaluate(config, workdir: str, model, states, shared, test_data=None,
                          prefix: str = "") -> dict:
  """Test accuracy of a classification run after the B-step chain and after each of
  config.classifier.inference_steps; writes <prefix>confusion.png and
  <prefix>accuracy_vs_steps.png to workdir."""
  if test_data is None:
    test_data = data_lib.load_images(config.data.name, "test", config.data.data_dir)
  data_lib.check_images(test_data.images, test_data.labels, config.data.image_size,
                        config.data.channels, config.data.num_classes, "test images")
  count = config.eval.max_test_examples or len(test_data.labels)
  images, labels = test_data.images[:count], test_data.labels[:count]
  params = [s.params for s in states]
  # N = B runs each block once (METHOD.md); the end-to-end classifier makes one call.
  steps = (sorted({model.num_blocks, *config.classifier.inference_steps}) if model.denoising
           else [1])
  accuracy = {}
  for num_steps in steps:
    predictions = classify.predict(model, params, shared.params, images, num_steps,
                                   seed=config.seed, progress=config.train.progress)
    accuracy[num_steps] = float(np.mean(predictions == labels))
    if num_steps == model.num_blocks:
      confusion = classify.confusion_matrix(labels, predictions, config.data.num_classes)
  plots.save_confusion_matrix(confusion, os.path.join(workdir, f"{prefix}confusion.png"),
                              title=f"{config.method}, {config.data.name}: accuracy "
                                    f"{accuracy[model.num_blocks]:.3f}")
  results = {"accuracy": accuracy[model.num_blocks], "inference_steps": model.num_blocks,
             "test_examples": int(count),
             "per_class_accuracy": (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()}
  if model.denoising:
    results["accuracy_by_steps"] = {str(n): a for n, a in accuracy.items()}
    plots.save_accuracy_vs_steps(accuracy, model.num_blocks,
                                 os.path.join(workdir, f"{prefix}accuracy_vs_steps.png"))
  return results


SAMPLES_FILE = "samples.txt"


def sampling_settings(config) -> dict:
  """The generation settings every language run is shown with: {name: (temperature,
  top_p)}."""
  lang = config.language
  return {"greedy": (0.0, 1.0), f"temperature {lang.temperature:g}": (lang.temperature, 1.0),
          f"top-p {lang.top_p:g}": (1.0, lang.top_p)}


def generate_text(config, model, states, shared, vocabulary: text.Vocabulary, seed: int = 0,
                  progress: bool = False) -> tuple[dict, float]:
  """({setting name: [texts]}, generated characters per second) of a language run,
  each text starting with config.language.prompt. The speed is of the greedy setting's
  second call, after compilation."""
  lang = config.language
  prompt = vocabulary.encode(lang.prompt, "config.language.prompt")
  params = [s.params for s in states]
  steps = language.generation_steps(config)
  texts, speed = {}, None
  for name, (temperature, top_p) in tqdm(sampling_settings(config).items(), desc="generating",
                                         disable=not progress, leave=False):
    generate = lambda: language.generate(model, params, shared.params, prompt,
                                         lang.num_samples, seed, temperature, top_p, steps)
    ids = generate()
    if speed is None:
      start = time.perf_counter()
      generate()
      speed = lang.num_samples * (model.net.seq_len - len(prompt)) / (
          time.perf_counter() - start)
    texts[name] = [vocabulary.decode(row) for row in ids]
  return texts, speed


def write_samples(path: str, texts: dict):
  """Write generated texts, each under a title naming its sampling setting."""
  with open(path, "w", encoding="utf-8") as f:
    for name, samples in texts.items():
      for i, sample in enumerate(samples):
        f.write(f"===== {name}, sample {i} =====\n{sample}\n\n")


def evaluate_language(config, workdir: str, model, states, shared, test_data,
                      prefix: str = "") -> dict:
  """Test bits per character (see language.sequence_nats) and generated text, written
  to <workdir>/<prefix>samples.txt."""
  count = config.eval.max_test_examples or test_data.num_examples
  tokens = test_data.tokens[:count]
  lang = config.language
  bits = language.bits_per_character(model, [s.params for s in states], shared.params, tokens,
                                     config.seed, lang.inference_steps or None,
                                     progress=config.train.progress,
                                     num_chains=lang.mixture_chains)
  results = {"bits_per_character": bits["headline"], "test_sequences": int(len(tokens)),
             "test_characters": int(tokens.size)}
  if "fixed_seed_chain" in bits:
    results["bits_per_character_fixed_seed_chain"] = bits["fixed_seed_chain"]
    if "chain_mixture" in bits:
      results["bits_per_character_chain_mixture"] = bits["chain_mixture"]
      results["mixture_chains"] = lang.mixture_chains
    results["inference_steps"] = lang.inference_steps or model.num_blocks
  texts, speed = generate_text(config, model, states, shared, test_data.vocabulary,
                               config.seed, config.train.progress)
  write_samples(os.path.join(workdir, f"{prefix}{SAMPLES_FILE}"), texts)
  results["generated_chars_per_second"] = speed
  return results


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (resuming if possible), then evaluate and write metrics.json, loss_curves.png
  and the task's pictures (samples.png; confusion.png and accuracy_vs_steps.png; or
  samples.txt for language) to `workdir`; return the metrics."""
  start = time.perf_counter()
  config_lib.validate(config)
  if config.task == "language":
    train_data, test_data = language.load_data(config)
    config = language.with_vocabulary(config, train_data.vocabulary)
  else:
    config, train_data = load_train_data(config)
  model, states, shared, history = train(config, workdir, train_data)
  train_seconds = time.perf_counter() - start
  if jax.process_index() != 0:  # on many hosts, process 0 evaluates and writes the files
    return {}
  metric = "loss" if config.task == "generation" else "cross_entropy"
  plots.save_loss_curves(history, model.num_blocks, os.path.join(workdir, "loss_curves.png"),
                         title=f"{config.method}, {config.data.name}", metric=metric)
  results = {"task": config.task, "method": config.method, "num_blocks": model.num_blocks,
             "iterations": config_lib.total_iterations(config),
             "train_seconds_this_session": train_seconds,
             "final_loss_per_block": final_losses(history, model.num_blocks),
             "skipped_updates": int(sum(r.get("skipped", 0) for r in history))}
  if config.task == "language":
    results["kind"] = config.language.kind
    if config.eval.enabled:
      results.update(evaluate_language(config, workdir, model, states, shared, test_data))
  elif config.task == "classification":
    if config.eval.enabled:
      results.update(classify_and_evaluate(config, workdir, model, states, shared))
  else:
    results.update(generate_and_evaluate(config, workdir, model, states,
                                         train_data=train_data))
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2)
  log = MetricLog(workdir, METRICS_FILE)
  log.write_results(results["iterations"], results)
  log.close()
  return results
