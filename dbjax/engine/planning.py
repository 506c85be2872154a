"""The number of blocks for a memory budget: the compiled train step of every B that
divides the layer count (nothing allocated), and the smallest B whose step fits.

The step's footprint is memory_analysis of the compiled step (arguments + outputs -
donated + temporaries: the active block's state, the shared state, the batch and the
step's activations, which is all the sequential driver keeps on the device while a
block trains); its FLOPs come from cost_analysis. experiments/plan_blocks.py prints them.
"""
import re

from dbjax import config as config_lib, tasks
from dbjax.engine import profiling
from dbjax.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
  """"8GiB" -> 8589934592; ConfigError naming the value otherwise."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise ConfigError(f"memory budget {text!r} is invalid: a number of bytes with an "
                      f"optional unit, one of {', '.join(u for u in _UNITS if u)}")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def candidates(config) -> list[int]:
  """Every B that divides model.num_layers, smallest first."""
  return [b for b in range(1, config.model.num_layers + 1) if config.model.num_layers % b == 0]


def footprints(config) -> list[dict]:
  """One row per candidate B: its compiled step's bytes and FLOPs (nothing allocated)."""
  rows = []
  for b in candidates(config):
    task = tasks.build(config_lib.variant(config, "diffusion_blocks", diffusion__num_blocks=b))
    compiled = profiling.compiled_train_step(task, config.train.batch_size)
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
    raise ConfigError(f"no number of blocks fits a memory budget of {budget} bytes: the "
                      f"smallest step footprint is {smallest['step_bytes']} bytes "
                      f"({smallest['step_bytes'] / 2**20:.1f} MiB) at B = "
                      f"{smallest['num_blocks']}; lower train.batch_size or the width")
  return min(fitting)
