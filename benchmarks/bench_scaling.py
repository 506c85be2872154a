r"""Sequential against parallel block training on the devices present, side by side.

  python -m benchmarks.bench_scaling --config=experiments/configs/digits.py \
      --out=benchmarks/results/bench_scaling_digits.json

Sequential: the default driver, one block at a time on one device, so B block
iterations take B block steps. Parallel (parallel.mode="blocks"): every step trains
all B blocks on a ("block", "data") mesh of all devices (dbjax.engine.parallel). Reported:
block iterations per second for both, per device, the speed-up, the per-device memory
of the compiled steps, and the collectives in the parallel step (none across blocks).

Fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) share the host's
cores, so there the table gives the counts (mesh, blocks per device, collectives,
memory) and no speed.
"""
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from dbjax import tasks
from dbjax.engine import parallel, profiling
from experiments.cli import config_help, method_variant, print_table, run, write_json
from benchmarks.hlo import collective_groups, crosses_blocks

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed steps of each kind")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_scaling_digits.json", "JSON output")


def fake_devices() -> bool:
  """Several CPU devices in one process: threads on the same cores, not real devices."""
  return jax.devices()[0].platform == "cpu" and jax.local_device_count() > 1


def parallel_trainer(config, task):
  """A trainer on all devices, compiled and warmed up by one step."""
  config = config.copy_and_resolve_references()
  config.parallel.mode = "blocks"
  _, data = tasks.load_data(config)
  states, shared = parallel.init_on_host(task, config.seed)
  trainer = parallel.BlockParallelTrainer(task, config, data.train, states, shared)
  trainer.train(np.arange(1))
  return trainer


def parallel_step_seconds(trainer, repeats: int) -> float:
  """Median seconds of one parallel step, batches built on the host as in training."""
  times = []
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    trainer.train(np.array([step]))  # returns after gathering the step's metrics
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  config, task = method_variant(_CONFIG.value, "diffusion_blocks")
  num_blocks, num_devices = task.num_blocks, jax.device_count()
  trainer = parallel_trainer(config, task)
  compiled = trainer.compiled[False]
  width = trainer.mesh.shape[parallel.DATA]
  groups = collective_groups(compiled.as_text(), trainer.mesh.size)
  rows = [{"schedule": "sequential", "devices": 1, "mesh": "-", "blocks_per_device": "all*",
           "step_memory_mib": profiling.train_step_memory(
               task, config.train.batch_size)["step_bytes"] / 2**20},
          {"schedule": "parallel", "devices": trainer.mesh.size,
           "mesh": f"{trainer.mesh.shape[parallel.BLOCK]}x{trainer.mesh.shape[parallel.DATA]}",
           "blocks_per_device": num_blocks // trainer.mesh.shape[parallel.BLOCK],
           "step_memory_mib": profiling.compiled_memory(compiled)["step_bytes"] / 2**20,
           "collectives_within_blocks": sum(not crosses_blocks(g, width)
                                            for g in groups),
           "collectives_across_blocks": sum(crosses_blocks(g, width)
                                            for g in groups)}]
  summary = {"device": jax.devices()[0].device_kind, "num_devices": num_devices,
             "num_blocks": num_blocks, "batch_size_per_block": config.train.batch_size,
             "fake_devices": fake_devices()}
  if not fake_devices():
    block_step = profiling.time_train_step(task, config.train.batch_size, _REPEATS.value)
    rows[0]["block_iterations_per_s"] = 1.0 / block_step
    rows[1]["block_iterations_per_s"] = num_blocks / parallel_step_seconds(trainer,
                                                                           _REPEATS.value)
    for row in rows:
      row["per_device"] = row["block_iterations_per_s"] / row["devices"]
    summary["speedup"] = rows[1]["block_iterations_per_s"] / rows[0]["block_iterations_per_s"]
  summary["rows"] = rows
  print_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
  print("* the sequential driver keeps all blocks in host memory and one on the device")
  if fake_devices():
    print(f"{num_devices} fake CPU devices share this host's cores: counts only, no speed")
  else:
    print(f"parallel / sequential block iterations per second = {summary['speedup']:.2f} "
          f"on {num_devices} x {summary['device']}")
  write_json(_OUT.value, summary)


if __name__ == "__main__":
  run(main)
