r"""What reading a data set costs: peak RSS against the set's size, and step time with
rows decoded per batch against the set in RAM. One JSON row per case.

  python -m benchmarks.bench_data --sizes=2000,16000 --text_sizes=5,100 \
      --out=benchmarks/results/bench_data_cpu.json

Generated 64 x 64 colour PNGs in a folder of 10 classes (made once under --scratch):
- `train_folder`: `experiments.train` on the folder, a tiny DiT (2 layers, width 32,
  batch 32), 3 iterations, no evaluation; `encode_latents`: `experiments.encode_latents`
  of both splits with benchmarks/encoders.py's 4 x 4 mean pooling (no weights: the rows,
  not the network, are measured). Each runs in a process of its own; `peak_rss_bytes` is its
  VmHWM. The figure to read is the difference between sizes: what a larger set costs.
- `tokenize_text`: `experiments.tokenize` of a generated UTF-8 file of --text_sizes MB
  (Shakespeare's plays, repeated), characters; `train_tokens`: `experiments.train` on
  those token files (shakespeare_ar.py, tiny: 2 layers, width 32, sequences of 64,
  batch 32), 3 iterations, no evaluation. Peak RSS as above.
- `step_time`: the sequential driver's steps (`train_interval`, after a warm-up
  interval that compiles) on the largest folder read by rows (data.cache_bytes 0) with
  and without batches read ahead (data.prefetch), against the same images in RAM, side
  by side in this process, their intervals interleaved; `seconds_per_step` is the
  median of --repeats intervals.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags

from experiments.cli import print_table, run, write_json

_SIZES = flags.DEFINE_list("sizes", ["2000", "16000"], "images in each generated folder")
_TEXT_SIZES = flags.DEFINE_list("text_sizes", ["5", "100"], "megabytes of each generated text")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/dbjax_bench_data", "where the folders go")
_STEPS = flags.DEFINE_integer("steps", 40, "iterations per timed interval")
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed intervals per source")
_OUT = flags.DEFINE_string("out", None, "the JSON file to write")

SIDE, CLASSES = 64, 10
# A tiny network and short run: the data, not the model, is what is measured.
SMALL = ["--config.model.num_layers=2", "--config.model.hidden_size=32",
         "--config.model.num_heads=2", "--config.diffusion.num_blocks=2",
         "--config.train.batch_size=32", "--config.train.warmup_steps=1",
         "--config.eval.enabled=False", "--config.train.progress=False"]
TINY = SMALL + ["--config.model.patch_size=8"]


def make_folder(root: str, count: int) -> str:
  """`count` 64 x 64 colour PNGs in CLASSES subfolders (kept: made once per size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = os.path.join(root, f"pngs_{count}")
  done = os.path.join(folder, ".complete")
  if os.path.exists(done):
    return folder
  rng = np.random.default_rng(count)
  for i in range(count):
    label = i % CLASSES
    os.makedirs(os.path.join(folder, f"class_{label}"), exist_ok=True)
    pixels = np.clip(20 * label + rng.integers(0, 60, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"class_{label}", f"{i}.png"))
  open(done, "w").close()
  return folder


def peak_rss_of(command: list[str]) -> int:
  """Peak RSS (VmHWM) of `command` run as a fresh process, by /usr/bin/time -v, with no
  compilation cache."""
  # Every process compiles afresh: a compilation cache that one size filled and the next
  # read would make their peaks differ by the compiler's memory, not the data's.
  env = dict(os.environ, DBJAX_COMPILATION_CACHE="off")
  result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True,
                          text=True, check=False, env=env)
  if result.returncode:
    raise RuntimeError(f"{command}: {result.stderr[-3000:]}")
  kib = next(line for line in result.stderr.splitlines()
             if "Maximum resident set size" in line).rsplit(":", 1)[1]
  return int(kib) * 1024


TEXT_TINY = SMALL + ["--config.language.seq_len=64"]


def make_text(root: str, megabytes: int) -> str:
  """A UTF-8 file of about `megabytes` MB: Shakespeare's plays, repeated (made once)."""
  from dbjax.data import text  # pylint: disable=g-import-not-at-top
  path = os.path.join(root, f"text_{megabytes}mb.txt")
  if not os.path.exists(path):
    plays = text.corpus("shakespeare")
    plays = plays[0] + plays[1]
    with open(path + ".partial", "w", encoding="utf-8") as f:
      written = 0
      while written < megabytes * 10**6:
        f.write(plays)
        written += len(plays)
    os.replace(path + ".partial", path)
  return path


def text_command_of(case: str, path: str, workdir: str) -> list[str]:
  """The command line of a text case: tokenize `path` into workdir/tokens, or train on
  those tokens."""
  tokens = os.path.join(workdir, "tokens")
  if case == "tokenize_text":
    return [sys.executable, "-m", "experiments.tokenize", f"--data=file:{path}",
            f"--out={tokens}"]
  return [sys.executable, "-m", "experiments.train",
          "--config=experiments/configs/shakespeare_ar.py", f"--workdir={workdir}/run",
          f"--config.data.name=tokens:{tokens}", "--config.train.num_steps=3",
          "--config.train.checkpoint_every=3", *TEXT_TINY]


def command_of(case: str, folder: str, workdir: str) -> list[str]:
  """The command line of a case on `folder`."""
  if case == "train_folder":
    return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/digits.py",
            f"--workdir={workdir}", f"--config.data.name=folder:{folder}",
            "--config.train.num_steps=3", "--config.train.checkpoint_every=3", *TINY]
  return [sys.executable, "-m", "experiments.encode_latents", f"--data=folder:{folder}",
          f"--out={workdir}", "--encoder=benchmarks.encoders:pool_encoder",
          "--decoder=none", "--batch_size=256"]


SOURCES = (("in RAM", 2**40, 0), ("by rows, read ahead", 0, 2),
           ("by rows, not read ahead", 0, 0))


def step_times(folder: str) -> list[dict]:
  """Seconds per step of the sequential driver on `folder`, by rows with and without
  read-ahead and in RAM: each source's intervals interleaved with the others' (A B C A
  B C ...), so a slower spell of this shared machine falls on all three alike."""
  import jax  # pylint: disable=g-import-not-at-top
  from dbjax import config as config_lib, tasks  # pylint: disable=g-import-not-at-top
  from dbjax.engine import driver, placement as placement_lib  # pylint: disable=g-import-not-at-top
  from dbjax.progress import progress_bar  # pylint: disable=g-import-not-at-top
  runs = []
  for name, cache_bytes, prefetch in SOURCES:
    config = config_lib.default_config()
    config.model.update(num_layers=2, hidden_size=32, num_heads=2, patch_size=8)
    config.diffusion.num_blocks = 2
    config.train.update(batch_size=32, warmup_steps=1, progress=False)
    config.data.update(name=f"folder:{folder}", cache_bytes=cache_bytes, prefetch=prefetch)
    config, run_data = tasks.load_data(config)
    task = tasks.build(config)
    placement = placement_lib.placement_of(task, config, jax.devices()[:1])
    states, shared = placement_lib.born_sharded(task, config.seed, placement)
    runs.append({"name": name, "config": config, "data": run_data.train, "task": task,
                 "placement": placement, "states": states, "shared": shared,
                 "step_fn": driver.jit_sharded_step(task, placement),
                 "progress": [0] * task.num_blocks, "seconds": []})
  bar = progress_bar(total=1, disable=True)
  for i in range(_REPEATS.value + 1):  # the first interval compiles
    chunk = np.arange(i * _STEPS.value, (i + 1) * _STEPS.value)
    for r in runs:
      start = time.perf_counter()
      _, r["shared"] = driver.train_interval(
          r["step_fn"], r["states"], r["shared"], r["task"], chunk, r["data"], r["config"],
          bar, r["progress"], lambda: False, r["placement"])
      jax.block_until_ready(r["states"])
      r["seconds"].append((time.perf_counter() - start) / len(chunk))
  rows = [{"case": "step_time", "source": r["name"], "images": r["data"].num_examples,
           "seconds_per_step": float(np.median(r["seconds"][1:]))} for r in runs]
  base = rows[0]["seconds_per_step"]
  for row in rows:
    row["against_in_ram"] = row["seconds_per_step"] / base
  return rows


def main(argv):
  del argv
  os.makedirs(_SCRATCH.value, exist_ok=True)
  sizes = [int(s) for s in _SIZES.value]
  folders = {n: make_folder(_SCRATCH.value, n) for n in sizes}
  rows = []
  for case in ("train_folder", "encode_latents"):
    for n in sizes:
      workdir = os.path.join(_SCRATCH.value, f"{case}_{n}_{time.monotonic_ns()}")
      rows.append({"case": case, "images": n,
                   "peak_rss_bytes": peak_rss_of(command_of(case, folders[n], workdir))})
    first, last = rows[-len(sizes)], rows[-1]
    last["peak_rss_over_smallest_mib"] = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / 2**20
  for case in ("tokenize_text", "train_tokens"):
    for megabytes in (int(m) for m in _TEXT_SIZES.value):
      workdir = os.path.join(_SCRATCH.value, f"text_{megabytes}")
      rows.append({"case": case, "megabytes": megabytes, "peak_rss_bytes": peak_rss_of(
          text_command_of(case, make_text(_SCRATCH.value, megabytes), workdir))})
    first, last = rows[-len(_TEXT_SIZES.value)], rows[-1]
    last["peak_rss_over_smallest_mib"] = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / 2**20
  rows += step_times(folders[max(sizes)])
  print_table(rows, ["case", "images", "megabytes", "source", "peak_rss_bytes",
                     "peak_rss_over_smallest_mib", "seconds_per_step", "against_in_ram"])
  if _OUT.value:
    write_json(_OUT.value, rows)
    print(json.dumps({"wrote": _OUT.value}))


if __name__ == "__main__":
  run(main)
