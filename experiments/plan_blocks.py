r"""The number of blocks for a memory budget: compile (without allocating anything) the
train step of each B that divides the layer count, and pick the smallest B whose step
fits the budget on one device.

  python -m experiments.plan_blocks --config=experiments/configs/fashion_mnist.py \
      --memory_budget=8GiB --out=results/plan_blocks_fashion_mnist.json

For each B it prints the layers per block, the compiled step's footprint (arguments +
outputs - donated + temporaries, from memory_analysis: the active block's state, the
shared state, the batch and the step's activations, which is all the sequential driver
keeps on the device while a block trains), the share of it that is the block's state,
and the compiled step's FLOPs against the end-to-end step's (cost_analysis): with B
times as many iterations at a matched budget, about the run's time ratio. A smaller B
means fewer, larger blocks, closer to end-to-end training (paper, Sec. 4 and App. G).
"""
import re

from absl import flags
from ml_collections import config_flags

from dbjax.engine import profiling
from dbjax.errors import ConfigError
from experiments.cli import config_help, method_variant, print_table, run, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fashion_mnist.py",
                                          config_help(), lock_config=True)
_BUDGET = flags.DEFINE_string("memory_budget", "8GiB", "device memory for one train step: "
                              "a number of bytes with an optional KB, MB, GB, KiB, MiB, GiB")
_OUT = flags.DEFINE_string("out", "", "JSON output ('' = none)")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
  """"8GiB" -> 8589934592; ConfigError naming the value otherwise."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise ConfigError(f"--memory_budget={text!r} is invalid: a number of bytes with an "
                      f"optional unit, one of {', '.join(u for u in _UNITS if u)}")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def candidates(config) -> list[int]:
  """Every B that divides model.num_layers, smallest first."""
  return [b for b in range(1, config.model.num_layers + 1) if config.model.num_layers % b == 0]


def footprints(config) -> list[dict]:
  """One row per candidate B: its compiled step's bytes and FLOPs (nothing allocated)."""
  rows = []
  for b in candidates(config):
    variant, task = method_variant(config, "diffusion_blocks", diffusion__num_blocks=b)
    compiled = profiling.compiled_train_step(task, variant.train.batch_size)
    memory = profiling.compiled_memory(compiled)
    rows.append({"num_blocks": b, "layers_per_block": config.model.num_layers // b,
                 "step_bytes": memory["step_bytes"], "state_bytes": profiling.state_bytes(task),
                 "step_flops": profiling.compiled_flops(compiled)})
  for row in rows:
    row["flops_over_end_to_end"] = row["step_flops"] / rows[0]["step_flops"]
  return rows


def choose(rows: list[dict], budget: int) -> int:
  """The smallest B whose step fits `budget` bytes; ConfigError when none does."""
  fitting = [r["num_blocks"] for r in rows if r["step_bytes"] <= budget]
  if not fitting:
    smallest = min(rows, key=lambda r: r["step_bytes"])
    raise ConfigError(f"no number of blocks fits --memory_budget={budget} bytes: the "
                      f"smallest step footprint is {smallest['step_bytes']} bytes "
                      f"({smallest['step_bytes'] / 2**20:.1f} MiB) at B = "
                      f"{smallest['num_blocks']}; lower train.batch_size or the width")
  return min(fitting)


def main(argv):
  del argv
  budget = parse_bytes(_BUDGET.value)
  config = _CONFIG.value
  rows = footprints(config)
  chosen = choose(rows, budget)
  print(f"{config.model.num_layers} layers, d={config.model.hidden_size}, batch "
        f"{config.train.batch_size}; budget {budget / 2**20:.1f} MiB (bytes in MiB)")
  print_table([{**r, "step_bytes": r["step_bytes"] / 2**20, "state_bytes": r["state_bytes"] /
                2**20, "fits": r["step_bytes"] <= budget} for r in rows],
              ["num_blocks", "layers_per_block", "step_bytes", "state_bytes",
               "flops_over_end_to_end", "fits"])
  print(f"chosen: --config.diffusion.num_blocks={chosen}")
  if _OUT.value:
    write_json(_OUT.value, {"budget_bytes": budget, "chosen": chosen, "rows": rows})


if __name__ == "__main__":
  run(main)
