r"""Kill a training run again and again; check that nothing is lost.

  python -m benchmarks.soak --config=experiments/configs/digits.py --minutes=10 \
      --workdir=runs/soak --out=benchmarks/results/soak_digits.json

Runs `experiments.train` with the given config as a child process and, each time it has
saved a new checkpoint, kills it at a random moment after (SIGKILL, or SIGTERM or SIGINT
for a share of kills), then restarts the same command, until --minutes have passed or
--max_kills kills; then lets it finish. It checks:
- every restart resumes from the newest checkpoint complete at the kill (steps lost
  beyond the last save: 0);
- SIGTERM and SIGINT save every iteration applied (within one train step of the signal)
  and exit with status 143 and 130; the seconds from the signal to the exit are timed;
- the final parameters equal, bit for bit, those of an uninterrupted run of the same
  command (run first, in <workdir>_reference).
It prints a table of kills and writes the summary as JSON.

With --processes=2 it soaks a two-process run on this machine (--parallel=blocks, two
fake CPU devices per process, a localhost coordinator): SIGTERM and SIGINT go to one
process chosen at random, and both must stop at the same step with the same status;
SIGKILL goes to both, as a scheduler reclaiming the job would.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
from absl import flags

from dbjax import train
from experiments.cli import print_table, run, write_json

_CONFIG = flags.DEFINE_string("config", "experiments/configs/digits.py", "experiment config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/soak", "workdir of the killed run")
_MINUTES = flags.DEFINE_float("minutes", 10.0, "stop killing after this long")
_MAX_KILLS = flags.DEFINE_integer("max_kills", 1000, "stop killing after this many kills")
_SIGTERM_SHARE = flags.DEFINE_float("sigterm_share", 0.25, "share of kills sent as SIGTERM")
_SIGINT_SHARE = flags.DEFINE_float("sigint_share", 0.25, "share of kills sent as SIGINT")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the kill times")
_SAVE_KILL_SHARE = flags.DEFINE_float("save_kill_share", 0.0, "share of the SIGKILLs sent "
                                      "while a checkpoint is being written")
_KILL_WINDOW = flags.DEFINE_float("kill_window", 1.0, "each kill lands a uniform random time "
                                  "in [0, this many seconds) after a new checkpoint")
_OVERRIDES = flags.DEFINE_multi_string("override", [],
                                       "config overrides, e.g. train.num_steps=100")
_PROCESSES = flags.DEFINE_integer("processes", 1, "1, or 2 for a two-process localhost run")
_OUT = flags.DEFINE_string("out", "benchmarks/results/soak_digits.json", "JSON output")

RESUME_LINE = re.compile(r"resuming from the checkpoint of (?:iteration|step) (\d+)")
STOP_LINE = re.compile(r"stopped by SIG\w+ after saving the checkpoint of (?:iteration|step) "
                       r"(\d+)")
# The exit status of a graceful stop: 128 + the signal's number.
GRACEFUL = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


def train_command(config_path: str, workdir: str, overrides=()) -> list[str]:
  return [sys.executable, "-m", "experiments.train", f"--config={config_path}",
          f"--workdir={workdir}", *(f"--config.{o}" for o in overrides)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_commands(command: list[str], processes: int) -> list[list[str]]:
  """The command for each of `processes` localhost processes (one: as it is), with a
  fresh coordinator port; each process gets two fake CPU devices (PROCESS_ENV)."""
  if processes == 1:
    return [command]
  address = f"localhost:{_free_port()}"
  return [[*command, "--parallel=blocks", "--distributed", f"--coordinator_address={address}",
           f"--num_processes={processes}", f"--process_id={i}"] for i in range(processes)]


# A process of a many-process soak: two CPU devices, before its backend starts.
PROCESS_ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def deliver_sigint():
  """In a child before it starts: SIGINT as a terminal delivers it, even when this
  process was started in the background with SIGINT ignored (which children inherit)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints (orbax renames a save's directory to its step
  only once it is complete)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _newest(workdir: str) -> int:
  return (saved_steps(workdir) or [0])[-1]


def _saving(workdir: str) -> bool:
  """Whether a checkpoint is being written (orbax's temporary directory exists)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(".orbax-checkpoint-tmp" in name
                                          for name in os.listdir(directory))


def reference_run(command: list[str], processes: int = 1):
  """The uninterrupted run, as child processes like the killed one: the same process
  set-up gives the same floating-point results (a process with other devices, e.g. a
  test worker with fake CPU devices, can differ in the last bits)."""
  children = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=PROCESS_ENV if processes > 1 else None)
              for c in process_commands(command, processes)]
  if any(child.wait() for child in children):
    raise RuntimeError(f"the reference run {' '.join(command)} failed")


def run_with_kills(command: list[str], workdir: str, rng: np.random.Generator,
                   max_kills: int, seconds: float, sigterm_share: float = 0.0,
                   kill_window: float = 1.0, poll: float = 0.05,
                   sigint_share: float = 0.0, save_kill_share: float = 0.0,
                   processes: int = 1) -> list[dict]:
  """Run `command` to the end, killing it up to `max_kills` times within `seconds`.

  Each kill waits until the process has saved a checkpoint newer than the one it
  started from, then a uniform random time in [0, kill_window) seconds; a share
  save_kill_share of the SIGKILLs waits instead for the next save to be under way.
  Returns one row
  per launch: the signal sent (or None for the last, finished launch), the seconds
  from it to the exit, the newest checkpoint on disk after it ended, the step the
  launch resumed from, the checkpoint a graceful stop said it saved, and the exit
  status.
  """
  launches, start = [], time.monotonic()
  os.makedirs(workdir, exist_ok=True)
  while True:
    kill = len(launches) < max_kills and time.monotonic() - start < seconds
    log_paths = [os.path.join(workdir, f"launch_{len(launches)}_{i}.log")
                 for i in range(processes)]
    began_at = _newest(workdir)
    logs = [open(path, "w") for path in log_paths]
    # Output to files, not pipes: a full pipe would stall a process in a collective.
    children = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT,
                                 env=PROCESS_ENV if processes > 1 else None,
                                 preexec_fn=deliver_sigint)
                for c, log in zip(process_commands(command, processes), logs)]
    sent, during_save = None, False
    if kill:
      while all(c.poll() is None for c in children) and _newest(workdir) <= began_at:
        time.sleep(poll)
      time.sleep(rng.uniform(0, kill_window))
      draw = rng.random()
      sent = (signal.SIGTERM if draw < sigterm_share else signal.SIGINT
              if draw < sigterm_share + sigint_share else signal.SIGKILL)
      during_save = sent == signal.SIGKILL and rng.random() < save_kill_share
      while during_save and all(c.poll() is None for c in children) and not _saving(workdir):
        time.sleep(0.002)
      # A graceful signal to one process (the others must follow); SIGKILL to all.
      targets = (children if sent == signal.SIGKILL or processes == 1
                 else [children[rng.integers(processes)]])
      if all(c.poll() is None for c in children):
        for target in targets:
          target.send_signal(sent)
      else:
        sent = None
    sent_at = time.monotonic()
    returncodes = [c.wait() for c in children]
    exit_seconds = time.monotonic() - sent_at
    for log in logs:
      log.close()
    texts = [open(path).read() for path in log_paths]
    resumed = RESUME_LINE.search(texts[0])
    stops = {int(m.group(1)) if (m := STOP_LINE.search(t)) else None for t in texts}
    launches.append({"launch": len(launches), "signal": sent.name if sent else None,
                     "during_save": bool(sent) and during_save,
                     "seconds_to_exit": round(exit_seconds, 2) if sent else None,
                     "returncode": returncodes[0] if len(set(returncodes)) == 1
                     else returncodes,
                     "resumed_from": int(resumed.group(1)) if resumed else 0,
                     # Every process names the same step, or the row shows them all.
                     "saved_on_stop": stops.pop() if len(stops) == 1 else sorted(stops, key=str),
                     "newest_after": _newest(workdir)})
    if sent is None and returncodes == [0] * processes:
      return launches
    if sent is None:  # it ended by itself, but not cleanly
      raise RuntimeError(f"launch {len(launches) - 1} failed with status {returncodes}; "
                         f"see {log_paths}")


def summarize(launches: list[dict]) -> dict:
  """Kills survived and the steps lost beyond the last save: each launch must resume
  from the newest checkpoint the launch before left on disk, and a graceful stop
  (SIGTERM, SIGINT) must have saved, as that newest one, every iteration it applied."""
  lost = [max(0, before["newest_after"] - after["resumed_from"])
          for before, after in zip(launches, launches[1:])]
  graceful = [l for l in launches if l["signal"] in GRACEFUL]
  exit_times = [l["seconds_to_exit"] for l in graceful]
  return {"kills": sum(l["signal"] is not None for l in launches),
          "sigkill": sum(l["signal"] == "SIGKILL" for l in launches),
          "sigterm": sum(l["signal"] == "SIGTERM" for l in launches),
          "sigint": sum(l["signal"] == "SIGINT" for l in launches),
          "sigkill_during_save": sum(bool(l.get("during_save")) for l in launches),
          "graceful_exit_status_ok": all(l["returncode"] == GRACEFUL[l["signal"]]
                                         for l in graceful),
          # A graceful stop that said nothing (it ended before training) saved nothing.
          "graceful_stops_saving_all_applied": sum(
              l["saved_on_stop"] is not None and l["saved_on_stop"] == l["newest_after"]
              for l in graceful),
          "max_seconds_signal_to_exit": max(exit_times) if exit_times else None,
          "mean_seconds_signal_to_exit": float(np.mean(exit_times)) if exit_times else None,
          "steps_lost_beyond_last_save": int(sum(lost)),
          "launches": len(launches)}


def same_parameters(workdir: str, reference: str) -> bool:
  _, _, states, shared = train.restore_run(workdir)
  _, _, expected, expected_shared = train.restore_run(reference)
  try:
    chex.assert_trees_all_equal((states, shared), (expected, expected_shared))
  except AssertionError:
    return False
  return True


def main(argv):
  del argv
  start = time.monotonic()
  reference = _WORKDIR.value.rstrip("/") + "_reference"
  reference_run(train_command(_CONFIG.value, reference, _OVERRIDES.value), _PROCESSES.value)
  launches = run_with_kills(train_command(_CONFIG.value, _WORKDIR.value, _OVERRIDES.value),
                            _WORKDIR.value, np.random.default_rng(_SEED.value),
                            _MAX_KILLS.value, 60 * _MINUTES.value, _SIGTERM_SHARE.value,
                            kill_window=_KILL_WINDOW.value, sigint_share=_SIGINT_SHARE.value,
                            save_kill_share=_SAVE_KILL_SHARE.value, processes=_PROCESSES.value)
  summary = dict(summarize(launches),
                 final_parameters_equal=same_parameters(_WORKDIR.value, reference),
                 config=_CONFIG.value, overrides=_OVERRIDES.value, processes=_PROCESSES.value,
                 seconds=time.monotonic() - start, rows=launches)
  print_table(launches, list(launches[0]))
  print(f"{summary['kills']} kills survived ({summary['sigkill']} SIGKILL, "
        f"{summary['sigterm']} SIGTERM, {summary['sigint']} SIGINT; graceful stops exited "
        f"within {summary['max_seconds_signal_to_exit']} s, "
        f"{summary['graceful_stops_saving_all_applied']} of them saving every iteration "
        f"applied); steps lost beyond the last save: "
        f"{summary['steps_lost_beyond_last_save']}; final parameters equal to the "
        f"uninterrupted run's: {summary['final_parameters_equal']}")
  write_json(_OUT.value, summary)
  if not summary["final_parameters_equal"] or summary["steps_lost_beyond_last_save"]:
    sys.exit(1)


if __name__ == "__main__":
  run(main)
