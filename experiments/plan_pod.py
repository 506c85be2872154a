r"""Plan a pod job from a laptop: per-device and per-host memory of end-to-end training
and of B blocks, from the train step compiled for the pod's mesh (nothing allocated).

  python -m experiments.plan_pod --config=experiments/configs/imagenet256_latent.py \
      --devices=16 --hosts=4 --device=tpu-v4 --device_memory=32GiB \
      --config.parallel.mesh.data=1 --config.parallel.mesh.fsdp=-1

The step is lowered and compiled for --devices fake CPU devices at the config's real
sizes (the compiled program's per-device bytes are what the pod's devices would need:
the active block's shards, the shared state, the batch's rows, the weights gathered
for a layer and the activations); nothing is allocated. Per host: the shards of the
blocks that wait in its host memory while one trains. Compiling a large model on a
CPU takes a minute or more a row, and XLA's compiler needs a large stack for it: run
under `ulimit -s unlimited` (the default 8 MiB crashed on a 7B-class LM).
Figures for two pod workloads: docs/scaling_out.md.
"""
import os
import sys


def _devices_wanted(argv) -> int:
  for arg in argv:
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 8


if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices_wanted(sys.argv)}")

import jax  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from dbjax.engine.planning import parse_bytes, pod_plan  # pylint: disable=wrong-import-position
from dbjax.errors import ConfigError  # pylint: disable=wrong-import-position
from experiments.cli import (  # pylint: disable=wrong-import-position
    config_help, print_table, run, write_json)

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
flags.DEFINE_integer("devices", 8, "devices in the pod (fake CPU devices stand in)")
_HOSTS = flags.DEFINE_integer("hosts", 1, "hosts (processes) the devices are spread over")
_DEVICE = flags.DEFINE_string("device", "accelerator", "the device's name, for the table")
_MEMORY = flags.DEFINE_string("device_memory", "16GiB", "each device's memory")
_BLOCKS = flags.DEFINE_list("blocks", [], "numbers of blocks to plan (default: those of "
                            "1..8 that divide the layer count)")
_OUT = flags.DEFINE_string("out", "", "JSON output ('' = none)")


def main(argv):
  del argv
  config = _CONFIG.value
  devices = jax.devices()
  if len(devices) % _HOSTS.value:
    raise ConfigError(f"--hosts={_HOSTS.value} is invalid: it must divide --devices="
                      f"{len(devices)}")
  memory = parse_bytes(_MEMORY.value)
  blocks = [int(b) for b in _BLOCKS.value] or [
      b for b in range(1, 9) if config.model.num_layers % b == 0]
  rows = pod_plan(config, devices, _HOSTS.value, blocks)
  for row in rows:
    row["fits"] = row["device_bytes"] <= memory
  gib = lambda n: n / 2**30
  print(f"{config.model.num_layers} layers, d={config.model.hidden_size}, batch "
        f"{config.train.batch_size}; {len(devices)} x {_DEVICE.value} of "
        f"{gib(memory):.1f} GiB on {_HOSTS.value} hosts (GiB)")
  print_table([{**r, **{k: gib(r[k]) for k in r if k.endswith("_bytes")}} for r in rows],
              ["method", "num_blocks", "layers_per_block", "mesh", "device_bytes",
               "device_state_bytes", "host_bytes", "block_state_bytes", "fits"])
  if _OUT.value:
    write_json(_OUT.value, {"device": _DEVICE.value, "device_memory_bytes": memory,
                            "devices": len(devices), "hosts": _HOSTS.value, "rows": rows})


if __name__ == "__main__":
  run(main)
