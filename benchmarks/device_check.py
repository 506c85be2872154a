r"""One check of an accelerator, in sections that fit a short lease:

- steps: train-step memory, step time and model FLOPs utilisation of end-to-end
  training and of one DiffusionBlocks block, in float32 and bfloat16, with and without
  rematerialisation, on --config;
- authors: dbjax's classifier at the two sizes of the authors' released code (their
  `load_vit`), end-to-end and one block, in float32 (their setting) and the larger size's
  block in bfloat16; beside the authors' own figures where the device is theirs;
- scaling, transfers: the parallel and the transfer benchmarks on the devices present.

Each row is printed and the JSON rewritten as soon as it is measured, so a run stopped
at any point keeps every finished row. --only picks sections.

  python -m benchmarks.device_check --out=benchmarks/results/device_check_h200.json
  python -m benchmarks.device_check --only=authors --out=benchmarks/results/authors_h200.json
  python -m benchmarks.device_check --tiny --out=/tmp/device_check.json   # any machine

The device machine has jax, flax, optax and orbax but not ml_collections, tensorboardX
or grain: carry their wheels (the transfers section trains through the driver, which
reads batches ahead with grain on an accelerator; --config.data.prefetch=0 does without).

Memory: the compiled step's footprint (memory_analysis). Time: the median of --repeats
steps of that same compiled step with the data on the device (--repeats=0: memory and
FLOPs only, for a CPU at the authors' sizes). MFU: the step's matrix-product FLOPs,
counted from its jaxpr (profiling.matmul_flops: 2 x output elements x contracted size per
dot_general, forward, backward and recomputation), per second, over the device's dense
peak for the dtype (PEAK_FLOPS; float32 matmuls run as TF32 on NVIDIA GPUs by default,
and in bfloat16 passes on TPUs); none where the peak is unknown (a CPU). Compiled
programs are kept in JAX's persistent compilation cache (experiments.cli), so a second
run compiles nothing.
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

from dbjax import tasks
from dbjax.config import variant
from dbjax.engine import profiling
from dbjax.errors import ConfigError
from experiments.cli import config_help, print_table, run, write_json
from experiments.configs import classify_cifar100

SECTIONS = ("steps", "authors", "scaling", "transfers")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fashion_mnist.py",
                                          config_help(), lock_config=True)
_TINY = flags.DEFINE_bool("tiny", False, "4-layer, width-32 networks and a batch of 8: "
                          "checks that the script works, on any machine")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed steps per row; 0: no timing")
_ONLY = flags.DEFINE_list("only", list(SECTIONS), f"sections to run, of {SECTIONS}")
_OUT = flags.DEFINE_string("out", "benchmarks/results/device_check.json", "JSON output")

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

# The two ViT sizes of the authors' released code (their load_vit): image size, width,
# heads, labels; both patch 4, 12 layers, MLP width 3072, B = 3, batch 128.
AUTHORS_SIZES = {"32x32": (32, 128, 4, 100), "64x64": (64, 768, 12, 200)}
# The authors' code as released (torch 2.11 eager, TF32, SDPA attention, AdamW), timed
# by this project on one NVIDIA H200 on 2026-12-04 at those sizes with random data
# (docs/history.md, "The device check"): (median ms per step, peak MiB of
# torch.cuda.max_memory_allocated, which holds all 12 layers' parameters and AdamW state).
AUTHORS_H200 = {("32x32", "end_to_end"): (53.2, 3079), ("32x32", "diffusion_blocks"): (33.7, 1337),
                ("64x64", "end_to_end"): (159.0, 20914),
                ("64x64", "diffusion_blocks"): (62.5, 10037)}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The dense peak of a device for `dtype` matmuls, or None when not in PEAK_FLOPS."""
  for name, (float32, bfloat16) in PEAK_FLOPS.items():
    if name in device_kind:
      return bfloat16 if dtype == "bfloat16" else float32
  return None


def shrunk(config):
  """The --tiny network: 4 layers of width 32, a batch of 8, B = 2."""
  config = config.copy_and_resolve_references()
  config.model.update(num_layers=4, hidden_size=32, num_heads=2, frequency_dim=32,
                      mlp_ratio=4.0)
  config.train.batch_size, config.diffusion.num_blocks = 8, 2
  return config


def authors_config(size: str, attention: str):
  """dbjax's classifier (classify_cifar100.py) at one of AUTHORS_SIZES, attending as
  --config.model.attention says."""
  image_size, width, heads, labels = AUTHORS_SIZES[size]
  config = classify_cifar100.get_config()
  config.model.attention = attention
  config.data.update(image_size=image_size, channels=3, num_classes=labels)
  config.model.update(num_layers=12, hidden_size=width, num_heads=heads, patch_size=4,
                      mlp_ratio=3072 / width)
  config.diffusion.num_blocks, config.train.batch_size = 3, 128
  return config


def measure(config, method: str, dtype: str, remat: bool, device_kind: str) -> dict:
  """Memory, time and MFU of one block's step (end-to-end: one block of L layers)."""
  config = variant(config, method, model__dtype=dtype, model__remat=remat)
  task, batch = tasks.build(config), config.train.batch_size
  start = time.perf_counter()
  compiled = profiling.compiled_train_step(task, batch)  # once, for memory and timing
  row = {"method": method + ("_remat" if remat else ""), "dtype": dtype,
         "attention": config.model.attention, "num_blocks": task.num_blocks,
         "step_mib": profiling.compiled_memory(compiled)["step_bytes"] / 2**20,
         "activation_mib": sum(profiling.saved_activation_bytes(task, batch).values()) / 2**20,
         "compile_s": time.perf_counter() - start}
  flops = profiling.matmul_flops(task, batch)
  row["matmul_gflop"] = flops / 1e9
  if _REPEATS.value > 0:
    seconds = profiling.time_train_step(task, batch, _REPEATS.value, step=compiled)
    peak = peak_flops(device_kind, dtype)
    row.update(step_ms=1e3 * seconds, tflop_per_s=flops / seconds / 1e12,
               mfu=flops / seconds / peak if peak else None)
  return row


def against_end_to_end(rows: list[dict], row: dict):
  """The e2e / block ratios of `row`, once its end-to-end twin (same dtype, remat and
  size) has been measured."""
  twin = next((r for r in rows if r is not row and r["dtype"] == row["dtype"]
               and r.get("size") == row.get("size")
               and r["method"] == row["method"].replace("diffusion_blocks", "end_to_end")),
              None)
  if twin is None or row["method"].startswith("end_to_end"):
    return
  row["e2e_over_db_memory"] = twin["step_mib"] / row["step_mib"]
  if "step_ms" in row:
    row["e2e_over_db_time"] = twin["step_ms"] / row["step_ms"]


def against_authors(row: dict, device_kind: str):
  """dbjax's memory and speed against the authors' figures, measured on an H200."""
  authors = AUTHORS_H200.get((row["size"], row["method"]))
  if authors is None or "H200" not in device_kind or row["dtype"] != "float32":
    return
  row.update(authors_ms=authors[0], authors_mib=authors[1],
             memory_over_authors=row["step_mib"] / authors[1])
  if "step_ms" in row:
    row["speedup_over_authors"] = authors[0] / row["step_ms"]


def steps_rows(config):
  """(config, method, dtype, remat, extra fields) of the `steps` section."""
  for dtype in ("float32", "bfloat16"):
    for remat in (False, True):
      for method in ("end_to_end", "diffusion_blocks"):
        yield config, method, dtype, remat, {}


def authors_rows(attention: str, remat: bool):
  """The `authors` section: both sizes in float32, end-to-end and one block, then the
  larger size's block in bfloat16 (the accelerator setting); attending and
  rematerialising as --config.model.attention and --config.model.remat say."""
  cases = [(size, method, "float32") for size in AUTHORS_SIZES
           for method in ("end_to_end", "diffusion_blocks")]
  for size, method, dtype in cases + [("64x64", "diffusion_blocks", "bfloat16")]:
    config = authors_config(size, attention)
    yield (shrunk(config) if _TINY.value else config), method, dtype, remat, {"size": size}


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
  unknown = sorted(set(_ONLY.value) - set(SECTIONS))
  if unknown:
    raise ConfigError(f"--only={','.join(_ONLY.value)}: {', '.join(unknown)} is not a "
                      f"section; choose from {','.join(SECTIONS)}")
  start = time.perf_counter()
  config = shrunk(_CONFIG.value) if _TINY.value else _CONFIG.value
  device_kind = jax.devices()[0].device_kind
  summary = {"device": device_kind, "num_devices": jax.device_count(),
             "jax": jax.__version__, "config": _CONFIG.value.data.name, "tiny": _TINY.value,
             "sections": [s for s in SECTIONS if s in _ONLY.value], "rows": [],
             "authors": []}

  def save():
    summary["seconds"] = time.perf_counter() - start
    write_json(_OUT.value, summary, quiet=True)

  sections = {"steps": ("rows", steps_rows(config)),
              "authors": ("authors", authors_rows(config.model.attention, config.model.remat))}
  for section in summary["sections"]:
    if section not in sections:
      continue
    name, cases = sections[section]
    rows = summary[name]
    for row_config, method, dtype, remat, extra in cases:
      row = {**extra, **measure(row_config, method, dtype, remat, device_kind)}
      rows.append(row)
      against_end_to_end(rows, row)
      if section == "authors":
        against_authors(row, device_kind)
      print(f"[{section}] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                         f"{k}={v}" for k, v in row.items()), flush=True)
      save()
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
  tiny = ["--config.model.num_layers=4", "--config.model.hidden_size=32",
          "--config.model.num_heads=2", "--config.train.batch_size=8",
          "--config.diffusion.num_blocks=2"] if _TINY.value else []
  if "scaling" in summary["sections"]:
    summary["scaling"] = run_benchmark("benchmarks.bench_scaling", [
        "--config=experiments/configs/digits.py", "--repeats=10", *tiny])
    save()
  if "transfers" in summary["sections"]:
    summary["transfers"] = run_benchmark("benchmarks.bench_transfers", [
        "--config=experiments/configs/digits.py", "--repeats=3", "--iterations=30", *tiny])
    save()
  for name in ("scaling", "transfers"):
    if "error" in summary.get(name, {}):
      print(f"the {name} benchmark failed: {summary[name]['error']}")
  if "speedup" in summary.get("scaling", {}):
    print(f"parallel / sequential: {summary['scaling']['speedup']:.2f} on "
          f"{summary['num_devices']} device(s)")
  for row in summary.get("transfers", {}).get("rows", []):
    print(f"transfers, {row['way']}: {row['waiting_share']:.1%} of an interval waiting")
  save()
  print(f"device: {device_kind}; {summary['seconds']:.0f} s; wrote {_OUT.value}")


if __name__ == "__main__":
  run(main)
