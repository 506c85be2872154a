r"""How a block's state and step spread over the mesh, one JSON row per case.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.bench_scale \
      --config=experiments/configs/digits.py --devices=1,2,4,8 \
      --out=benchmarks/results/bench_scale_digits.json

  python -m benchmarks.bench_scale --processes=2 \
      --out=benchmarks/results/bench_scale_two_processes.json

For every device count N: sequential mode on a (block 1, data 1, fsdp N) mesh, and
parallel mode (block -1, fsdp the rest). Each row: `state_bytes`, one block's
parameters and optimizer state whole; `state_bytes_per_device`, the largest per-device
sum of that state's shards as the run places them (dbjax.engine.mesh); and the compiled
step's argument and temporary bytes per device (memory_analysis of the program lowered
and compiled for the mesh; nothing is allocated for it). The fake CPU devices make the
counts exact and say nothing of speed.

With --processes=2: two processes on localhost (jax.distributed, 4 fake CPU devices
each) train B = 4 blocks of about 1 GiB of state in all, sequential mode over the 8
devices (fsdp 8), and checkpoint once. One row per process: `peak_rss_bytes` (VmHWM,
through the checkpoint), `base_rss_bytes` (RSS once JAX has started, before any state
exists), `checkpoint_bytes_written` (the bytes of the files this process wrote) and
`all_blocks_state_bytes`.
"""
import os
import sys


def _devices_wanted(argv) -> int:
  """The largest --devices count, read before jax starts (it fixes the device count);
  a worker of --processes has 4."""
  if any(arg.startswith("--worker=") for arg in argv):
    return PROCESS_DEVICES
  for arg in argv:
    if arg.startswith("--devices="):
      return max(int(n) for n in arg.split("=", 1)[1].split(","))
  return 8


PROCESS_DEVICES = 4


if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices_wanted(sys.argv)}")

import jax  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
from dbjax.engine import mesh as mesh_lib, parallel, profiling
from dbjax.engine import state as state_lib
from dbjax.engine.planning import abstract_with, compiled_sharded_step, per_device_bytes
from experiments.cli import config_help, method_variant, print_table, run, write_json
# pylint: enable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "device counts to place on")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_scale_digits.json", "JSON output")
_PROCESSES = flags.DEFINE_integer("processes", 0, "run this many processes on localhost "
                                  "instead (the multi-host rows; see the docstring)")
_WORKER = flags.DEFINE_integer("worker", -1, "internal: this process's index")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "internal: the coordinator address")
_WORKDIR = flags.DEFINE_string("workdir", "", "internal: the run's workdir")


def sequential_row(config, task, devices) -> dict:
  """Sequential mode on a (1, 1, N) mesh: the block's placement and its compiled step."""
  config = config.copy_and_resolve_references()
  config.parallel.mode = "none"
  config.parallel.mesh.update(block=1, data=1, fsdp=len(devices), tensor=1)
  compiled, placement = compiled_sharded_step(task, config, devices)
  block, _ = state_lib.abstract_states(task)
  return row("sequential", placement.mesh, block, placement.block, compiled)


def parallel_row(config, task, devices) -> dict:
  """Parallel mode (block -1, fsdp the rest): one block's share and the compiled step."""
  config = config.copy_and_resolve_references()
  config.parallel.mode = "blocks"
  config.parallel.mesh.update(block=-1, data=1, fsdp=-1, tensor=1)
  trainer = parallel.BlockParallelTrainer(task, config, None, devices=devices,
                                          allocate=False)  # shardings only: no data
  block, _ = state_lib.abstract_states(task)
  n = task.num_blocks
  stacked, shared = (parallel.stacked_abstract(t, n) for t in state_lib.abstract_states(task))
  example = task.example_batch(config.train.batch_size)
  args = (abstract_with(stacked, trainer.state_shardings),
          abstract_with(shared, trainer.shared_shardings),
          tuple(jax.ShapeDtypeStruct((n, *x.shape), x.dtype,
                                     sharding=mesh_lib.batch_sharding(trainer.mesh, True))
                for x in example),
          jax.ShapeDtypeStruct((n, 2), "uint32", sharding=trainer.intervals.sharding),
          jax.ShapeDtypeStruct((n, 2), "float32", sharding=trainer.intervals.sharding))
  compiled = parallel.make_step(task, trainer.mesh, trainer.state_shardings,
                                trainer.shared_shardings).lower(*args).compile()
  # A slice holds B / G blocks: one block's share is the stack's over that many.
  per_slice = n // trainer.mesh.shape[mesh_lib.BLOCK]
  result = row("blocks", trainer.mesh, block, None, compiled)
  result["state_bytes_per_device"] = per_device_bytes(stacked, trainer.state_shardings) \
      // per_slice
  return result


def row(mode, mesh, block, shardings, compiled) -> dict:
  memory = profiling.compiled_memory(compiled)
  return {"mode": mode, "devices": mesh.size,
          "mesh": ",".join(f"{k}={v}" for k, v in mesh.shape.items()),
          "state_bytes": sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(block)),
          "state_bytes_per_device": shardings and per_device_bytes(block, shardings),
          "argument_bytes_per_device": memory["argument_bytes"],
          "temp_bytes_per_device": memory["temp_bytes"]}


def rss_bytes(field: str = "VmRSS") -> int:
  """This process's resident memory (VmRSS) or its peak (VmHWM), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def gigabyte_config():
  """B = 4 blocks of 5 DiT layers 512 wide on digits: about 1.1 GiB of block states in
  all (parameters and Adam's moments), trained 2 iterations a block, one checkpoint."""
  from dbjax.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.model.update(num_layers=20, hidden_size=512, num_heads=8)
  config.diffusion.num_blocks = 4
  config.train.update(num_steps=2, batch_size=8, checkpoint_every=8, progress=False,
                      warmup_steps=1)
  config.parallel.mesh.update(data=1, fsdp=-1)
  config.eval.enabled = False
  return config


def worker(index: int, num_processes: int) -> dict:
  """One process of the --processes run: its row."""
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=num_processes, process_id=index)
  jax.devices()
  base = rss_bytes()
  from dbjax import tasks, train  # pylint: disable=g-import-not-at-top
  from dbjax.engine.checkpoint import writer_of  # pylint: disable=g-import-not-at-top
  config, data = tasks.load_data(gigabyte_config())
  task = tasks.build(config)
  block, _ = state_lib.abstract_states(task)
  train.train(config, _WORKDIR.value, data.train)
  written = 0
  for root, _, names in os.walk(os.path.join(_WORKDIR.value, "checkpoints")):
    for name in names:
      path = os.path.join(root, name)
      step_dir = os.path.join(*os.path.relpath(path, _WORKDIR.value).split(os.sep)[:2])
      if writer_of(os.path.relpath(path, os.path.join(_WORKDIR.value, step_dir))) == index:
        written += os.path.getsize(path)
  whole = task.num_blocks * sum(leaf.size * leaf.dtype.itemsize
                                for leaf in jax.tree.leaves(block))
  return {"process": index, "processes": num_processes, "devices": jax.device_count(),
          "base_rss_bytes": base, "peak_rss_bytes": rss_bytes("VmHWM"),
          "checkpoint_bytes_written": written, "all_blocks_state_bytes": whole,
          "peak_over_base_per_state": (rss_bytes("VmHWM") - base) / whole}


def launch(num_processes: int) -> list[dict]:
  """Run the workers as processes on localhost; their rows."""
  import json  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = tempfile.mkdtemp(prefix="bench_scale_")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={PROCESS_DEVICES}")
  processes = [subprocess.Popen(
      [sys.executable, "-m", "benchmarks.bench_scale", f"--worker={i}",
       f"--processes={num_processes}", f"--coordinator=localhost:{port}",
       f"--workdir={workdir}", f"--out={workdir}/row_{i}.json"], env=env)
      for i in range(num_processes)]
  if any(p.wait(timeout=600) for p in processes):
    raise RuntimeError(f"a worker failed: {[p.returncode for p in processes]}")
  rows = []
  for i in range(num_processes):
    with open(os.path.join(workdir, f"row_{i}.json")) as f:
      rows.append(json.load(f))
  return rows


def main(argv):
  del argv
  if _WORKER.value >= 0:
    import json  # pylint: disable=g-import-not-at-top
    row_of_worker = worker(_WORKER.value, _PROCESSES.value)
    with open(_OUT.value, "w") as f:
      json.dump(row_of_worker, f)
    return
  if _PROCESSES.value:
    rows = launch(_PROCESSES.value)
    print_table(rows, list(rows[0]))
    write_json(_OUT.value, {"rows": rows})
    return
  config, task = method_variant(_CONFIG.value, "diffusion_blocks")
  rows = []
  for count in map(int, _DEVICES.value):
    devices = jax.devices()[:count]
    rows.append(sequential_row(config, task, devices))
    rows.append(parallel_row(config, task, devices))
  for r in rows:
    r["per_device_over_whole"] = r["state_bytes_per_device"] / r["state_bytes"]
  print_table(rows, list(rows[0]))
  write_json(_OUT.value, {"config": _CONFIG.value.data.name, "num_blocks": task.num_blocks,
                          "device": jax.devices()[0].device_kind, "rows": rows})


if __name__ == "__main__":
  run(main)
