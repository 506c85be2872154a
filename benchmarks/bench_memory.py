r"""Train-step memory of end-to-end training against DiffusionBlocks, for B = 1, 2, 3, 4, 6.

For one network (default: the Fashion-MNIST DiT, 12 layers, d=128, 49 tokens, batch
128; --config=experiments/configs/cifar10.py for the paper's DiT-S/2 on an accelerator),
each method's compiled train-step footprint (memory_analysis) and the bytes resident on
the device while it trains. Paper, App. G: end-to-end needs (4P+A)L,
rematerialisation 4PL+A, DiffusionBlocks (4P+A)L/B. Each is measured in float32 and in
bfloat16 (config model.dtype: activations and matmuls in bfloat16, parameters and
optimizer state float32), with the ratio of the two, and with the activations the
backward pass keeps, read from the program before compilation (activation_bytes): XLA's
CPU backend computes bfloat16 in float32, so on a CPU only that column shows what
bfloat16 saves on an accelerator.

  python -m benchmarks.bench_memory --out=benchmarks/results/bench_memory.jsonl
  python -m benchmarks.bench_memory --config=experiments/configs/shakespeare_ar.py \
      --dtypes=float32 --time --out=benchmarks/results/bench_memory_shakespeare_ar.jsonl

--time adds each step's median time and the end-to-end / DiffusionBlocks time ratio.

Prints a table and writes one JSON line per configuration.
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from dbjax.engine import profiling
from experiments.cli import config_help, method_variant, print_table, run

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fashion_mnist.py",
                                          config_help(), lock_config=True)
_BLOCKS = flags.DEFINE_list("num_blocks", ["1", "2", "3", "4", "6"], "values of B")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "computation dtypes")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_memory.jsonl", "JSON lines output")
_TIME = flags.DEFINE_bool("time", False, "also time each step (median of 10, data on the "
                          "device): what a memory saving costs")


def measure(config, method: str, num_blocks: int, remat: bool, dtype: str) -> dict:
  config, task = method_variant(config, method, diffusion__num_blocks=num_blocks,
                                model__remat=remat, model__dtype=dtype)
  batch = config.train.batch_size
  memory = profiling.train_step_memory(task, batch)
  name = method + ("_remat" if remat else "")
  return {"method": name, "dtype": dtype, "num_blocks": num_blocks,
          "layers_per_block": task.network_config.num_layers, **memory,
          "activation_bytes": sum(profiling.saved_activation_bytes(task, batch).values()),
          "state_bytes": profiling.state_bytes(task),
          "resident_bytes": profiling.resident_bytes(task, batch),
          **({"step_ms": 1000 * profiling.time_train_step(task, batch)} if _TIME.value else {})}


def main(argv):
  del argv
  config = _CONFIG.value
  rows = []
  for dtype in _DTYPES.value:
    for remat in (False, True):
      baseline = measure(config, "end_to_end", 1, remat, dtype)
      rows.append(baseline)
      for b in map(int, _BLOCKS.value):
        if config.model.num_layers % b:
          continue
        row = measure(config, "diffusion_blocks", b, remat, dtype)
        row["step_ratio"] = baseline["step_bytes"] / row["step_bytes"]
        row["resident_ratio"] = baseline["resident_bytes"] / row["resident_bytes"]
        row["step_ratio_over_B"] = row["step_ratio"] / b
        if _TIME.value:
          row["step_time_ratio"] = baseline["step_ms"] / row["step_ms"]
        rows.append(row)
  float32 = {(r["method"], r["num_blocks"]): r for r in rows if r["dtype"] == "float32"}
  for row in rows:  # this dtype's step against float32's, the same method and B
    if (same := float32.get((row["method"], row["num_blocks"]))) is not None:
      row["step_vs_float32"] = row["step_bytes"] / same["step_bytes"]
      row["activations_vs_float32"] = row["activation_bytes"] / same["activation_bytes"]
  _, task = method_variant(config, "end_to_end")
  shapes = " and ".join(str(tuple(x.shape)) for x in task.example_batch(config.train.batch_size))
  print(f"network: {config.model.num_layers} layers, d={config.model.hidden_size}, batch "
        f"{shapes}; ratios are end-to-end / "
        "DiffusionBlocks (remat rows against end-to-end with remat)")
  mib = [{**r, **{k: r[k] / 2**20 for k in ("step_bytes", "temp_bytes", "resident_bytes",
                                               "activation_bytes")}}
         for r in rows]
  print_table(mib, ["method", "dtype", "num_blocks", "layers_per_block", "step_bytes",
                    "temp_bytes", "resident_bytes", "activation_bytes", "step_ratio",
                    "step_ratio_over_B", "resident_ratio", "step_vs_float32",
                    "activations_vs_float32"] + (["step_ms", "step_time_ratio"] if _TIME.value
                                                 else []))
  print("(bytes columns in MiB)")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  run(main)
