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
from absl import flags
from ml_collections import config_flags

from dbjax.engine.planning import choose, footprints, parse_bytes
from experiments.cli import config_help, print_table, run, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fashion_mnist.py",
                                          config_help(), lock_config=True)
_BUDGET = flags.DEFINE_string("memory_budget", "8GiB", "device memory for one train step: "
                              "a number of bytes with an optional KB, MB, GB, KiB, MiB, GiB")
_OUT = flags.DEFINE_string("out", "", "JSON output ('' = none)")


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
