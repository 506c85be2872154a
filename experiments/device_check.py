r"""One check of an accelerator: train-step memory, step time and model FLOPs utilisation
of end-to-end training and of one DiffusionBlocks block, in float32 and bfloat16, with
and without rematerialisation; then the scaling and the transfer benchmarks on the
devices present. One table, one JSON file; about 5 minutes on a GPU.

  python -m experiments.device_check --out=results/device_check_h200.json
  python -m experiments.device_check --tiny --out=/tmp/device_check.json   # a CPU, minutes

Memory: the compiled step's footprint (memory_analysis). Time: the median of --repeats
steps with the data on the device. MFU: the step's matrix-product FLOPs, counted from its
jaxpr (profiling.matmul_flops: 2 x output elements x contracted size per dot_general,
forward, backward and recomputation), per second, over the device's dense peak for the
dtype (PEAK_FLOPS; float32 matmuls run as TF32 on NVIDIA GPUs by default, and in bfloat16
passes on TPUs); none where the peak is unknown (a CPU).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
from absl import flags
from ml_collections import config_flags

from dbjax.engine import profiling
from experiments.cli import config_help, method_variant, print_table, run, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fashion_mnist.py",
                                          config_help(), lock_config=True)
_TINY = flags.DEFINE_bool("tiny", False, "a 4-layer, width-32 network and a batch of 8: "
                          "checks that the script works, on any machine")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed steps per variant")
_OUT = flags.DEFINE_string("out", "results/device_check.json", "JSON output")

# Dense peak FLOP/s per chip, by a piece of jax's device_kind: (float32, bfloat16).
# NVIDIA's H100/H200 and A100 datasheets (TF32 and BF16 tensor cores, without
# sparsity); Google Cloud's TPU pages (bfloat16; float32 matmuls run in bfloat16 passes
# at JAX's default precision).
PEAK_FLOPS = {
    "H200": (494.7e12, 989.4e12), "H100": (494.7e12, 989.4e12),
    "A100": (156e12, 312e12),
    "TPU v6": (918e12, 918e12), "TPU v5p": (459e12, 459e12),
    "TPU v5 lite": (197e12, 197e12), "TPU v4": (275e12, 275e12),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The dense peak of a device for `dtype` matmuls, or None when not in PEAK_FLOPS."""
  for name, (float32, bfloat16) in PEAK_FLOPS.items():
    if name in device_kind:
      return bfloat16 if dtype == "bfloat16" else float32
  return None


def shrunk(config):
  """The --tiny network: 4 layers of width 32, a batch of 8, B = 2."""
  config = config.copy_and_resolve_references()
  config.model.update(num_layers=4, hidden_size=32, num_heads=2, frequency_dim=32)
  config.train.batch_size, config.diffusion.num_blocks = 8, 2
  return config


def measure(config, method: str, dtype: str, remat: bool, device_kind: str) -> dict:
  """Memory, time and MFU of one block's step (end-to-end: one block of L layers)."""
  config, task = method_variant(config, method, model__dtype=dtype, model__remat=remat)
  batch = config.train.batch_size
  seconds = profiling.time_train_step(task, batch, _REPEATS.value)
  flops = profiling.matmul_flops(task, batch)
  peak = peak_flops(device_kind, dtype)
  return {"method": method + ("_remat" if remat else ""), "dtype": dtype,
          "num_blocks": task.num_blocks,
          "step_mib": profiling.train_step_memory(task, batch)["step_bytes"] / 2**20,
          "activation_mib": sum(profiling.saved_activation_bytes(task, batch).values()) / 2**20,
          "step_ms": 1e3 * seconds, "matmul_gflop": flops / 1e9,
          "tflop_per_s": flops / seconds / 1e12,
          "mfu": flops / seconds / peak if peak else None}


def run_benchmark(module: str, flags_: list[str]) -> dict:
  """Another benchmark script's JSON summary, run as its own process (its own flags)."""
  with tempfile.TemporaryDirectory() as directory:
    out = os.path.join(directory, "out.json")
    done = subprocess.run([sys.executable, "-m", module, f"--out={out}", *flags_],
                          capture_output=True, text=True)
    if done.returncode:
      return {"error": done.stderr.strip().splitlines()[-1:]}
    with open(out) as f:
      return json.load(f)


def main(argv):
  del argv
  start = time.perf_counter()
  config = shrunk(_CONFIG.value) if _TINY.value else _CONFIG.value
  device_kind = jax.devices()[0].device_kind
  rows = [measure(config, method, dtype, remat, device_kind)
          for dtype in ("float32", "bfloat16") for remat in (False, True)
          for method in ("end_to_end", "diffusion_blocks")]
  for row in rows:  # against end-to-end with the same dtype and remat
    e2e = next(r for r in rows if r["dtype"] == row["dtype"]
               and r["method"] == row["method"].replace("diffusion_blocks", "end_to_end"))
    row["e2e_over_db_memory"] = e2e["step_mib"] / row["step_mib"]
    row["e2e_over_db_time"] = e2e["step_ms"] / row["step_ms"]
  print_table(rows, list(rows[0]))
  tiny = ["--config.model.num_layers=4", "--config.model.hidden_size=32",
          "--config.model.num_heads=2", "--config.train.batch_size=8",
          "--config.diffusion.num_blocks=2"] if _TINY.value else []
  summary = {"device": device_kind, "num_devices": jax.device_count(),
             "config": _CONFIG.value.data.name, "tiny": _TINY.value, "rows": rows,
             "scaling": run_benchmark("experiments.bench_scaling", [
                 "--config=experiments/configs/digits.py", "--repeats=10", *tiny]),
             "transfers": run_benchmark("experiments.bench_transfers", [
                 "--config=experiments/configs/digits.py", "--repeats=3",
                 "--iterations=30", *tiny])}
  summary["seconds"] = time.perf_counter() - start
  for name in ("scaling", "transfers"):
    if "error" in summary[name]:
      print(f"the {name} benchmark failed: {summary[name]['error']}")
  if "speedup" in summary["scaling"]:
    print(f"parallel / sequential: {summary['scaling']['speedup']:.2f} on "
          f"{summary['num_devices']} device(s)")
  for row in summary["transfers"].get("rows", []):
    print(f"transfers, {row['way']}: {row['waiting_share']:.1%} of an interval waiting")
  print(f"device: {device_kind}; {summary['seconds']:.0f} s")
  write_json(_OUT.value, summary)


if __name__ == "__main__":
  run(main)
