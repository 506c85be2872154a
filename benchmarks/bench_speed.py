r"""Step time of end-to-end training against one DiffusionBlocks block, side by side in
one run, and sampling throughput of both.

  python -m benchmarks.bench_speed --config=experiments/configs/digits.py \
      --out=benchmarks/results/bench_speed_digits.json

A block holds L/B layers, so its step should take about 1/B of an end-to-end step
(paper, Table 12: 0.0507 s against 0.0181 s per iteration on an H100, B=3).
"""
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from dbjax.engine import profiling, state
from dbjax.errors import ConfigError
from dbjax.sampling import stack_params
from dbjax.tasks import images
from experiments.cli import config_help, method_variant, print_table, run, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed steps per method")
_SAMPLES = flags.DEFINE_integer("num_samples", 500, "images generated per method")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_speed_digits.json", "JSON output")


def samples_per_second(task, config, num_samples: int) -> float:
  states, _ = state.init_on_host(task, 0)
  stacked = stack_params([s.params for s in states])
  labels = np.arange(num_samples) % config.data.num_classes
  run = lambda: images.sample_in_batches(task, stacked, jax.random.key(0), labels,
                                         config.sample.num_steps, config.sample.solver,
                                         config.sample.guidance_scale, batch_size=num_samples)
  run()  # compile
  start = time.perf_counter()
  run()
  return num_samples / (time.perf_counter() - start)


def main(argv):
  del argv
  if _CONFIG.value.task != "generation":
    raise ConfigError(f"config.task={_CONFIG.value.task!r}: bench_speed times image "
                      "sampling; give an image generation config")
  rows = []
  for method in ("end_to_end", "diffusion_blocks"):
    config, task = method_variant(_CONFIG.value, method)
    rows.append({"method": method, "num_blocks": task.num_blocks,
                 "layers_per_step": task.network_config.num_layers,
                 "step_seconds": profiling.time_train_step(task, config.train.batch_size,
                                                           _REPEATS.value),
                 "samples_per_second": samples_per_second(task, config, _SAMPLES.value)})
  e2e, db = rows
  b = db["num_blocks"]
  summary = {"device": jax.devices()[0].device_kind, "batch_size": config.train.batch_size,
             "step_time_ratio": e2e["step_seconds"] / db["step_seconds"],
             "step_time_ratio_over_B": e2e["step_seconds"] / db["step_seconds"] / b,
             "sampling_speed_ratio": db["samples_per_second"] / e2e["samples_per_second"],
             "rows": rows}
  print_table(rows, list(rows[0]))
  print(f"end-to-end step / one block step = {summary['step_time_ratio']:.2f} "
        f"(B = {b}; target >= {0.8 * b:.1f}); sampling speed DB / end-to-end = "
        f"{summary['sampling_speed_ratio']:.2f}; device: {summary['device']}")
  write_json(_OUT.value, summary)


if __name__ == "__main__":
  run(main)
