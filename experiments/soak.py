r"""Kill a training run again and again; check that nothing is lost.

  python -m experiments.soak --config=experiments/configs/digits.py --minutes=10 \
      --workdir=runs/soak --out=results/soak_digits.json

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
"""
import os
import re
import signal
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
_OUT = flags.DEFINE_string("out", "results/soak_digits.json", "JSON output")

RESUME_LINE = re.compile(r"resuming from the checkpoint of (?:iteration|step) (\d+)")
STOP_LINE = re.compile(r"stopped by SIG\w+ after saving the checkpoint of (?:iteration|step) "
                       r"(\d+)")
# The exit status of a graceful stop: 128 + the signal's number.
GRACEFUL = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


def train_command(config_path: str, workdir: str, overrides=()) -> list[str]:
  return [sys.executable, "-m", "experiments.train", f"--config={config_path}",
          f"--workdir={workdir}", *(f"--config.{o}" for o in overrides)]


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


def reference_run(command: list[str]):
  """The uninterrupted run, as a child process like the killed one: the same process
  set-up gives the same floating-point results (a process with other devices, e.g. a
  test worker with fake CPU devices, can differ in the last bits)."""
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_with_kills(command: list[str], workdir: str, rng: np.random.Generator,
                   max_kills: int, seconds: float, sigterm_share: float = 0.0,
                   kill_window: float = 1.0, poll: float = 0.05,
                   sigint_share: float = 0.0, save_kill_share: float = 0.0) -> list[dict]:
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
    log_path = os.path.join(workdir, f"launch_{len(launches)}.log")
    began_at = _newest(workdir)
    with open(log_path, "w") as log:
      process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
      sent = None
      if kill:
        while process.poll() is None and _newest(workdir) <= began_at:
          time.sleep(poll)
        time.sleep(rng.uniform(0, kill_window))
        draw = rng.random()
        sent = (signal.SIGTERM if draw < sigterm_share else signal.SIGINT
                if draw < sigterm_share + sigint_share else signal.SIGKILL)
        during_save = sent == signal.SIGKILL and rng.random() < save_kill_share
        while during_save and process.poll() is None and not _saving(workdir):
          time.sleep(0.002)
        if process.poll() is None:
          process.send_signal(sent)
        else:
          sent = None
      sent_at = time.monotonic()
      returncode = process.wait()
      exit_seconds = time.monotonic() - sent_at
    with open(log_path) as log:
      text = log.read()
    resumed, stopped = RESUME_LINE.search(text), STOP_LINE.search(text)
    launches.append({"launch": len(launches), "signal": sent.name if sent else None,
                     "during_save": bool(sent) and during_save,
                     "seconds_to_exit": round(exit_seconds, 2) if sent else None,
                     "returncode": returncode, "resumed_from": int(resumed.group(1))
                     if resumed else 0, "saved_on_stop": int(stopped.group(1))
                     if stopped else None, "newest_after": _newest(workdir)})
    if sent is None and returncode == 0:
      return launches
    if sent is None:  # it ended by itself, but not cleanly
      raise RuntimeError(f"launch {len(launches) - 1} failed with status {returncode}; "
                         f"see {log_path}")


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
  reference_run(train_command(_CONFIG.value, reference, _OVERRIDES.value))
  launches = run_with_kills(train_command(_CONFIG.value, _WORKDIR.value, _OVERRIDES.value),
                            _WORKDIR.value, np.random.default_rng(_SEED.value),
                            _MAX_KILLS.value, 60 * _MINUTES.value, _SIGTERM_SHARE.value,
                            kill_window=_KILL_WINDOW.value, sigint_share=_SIGINT_SHARE.value,
                            save_kill_share=_SAVE_KILL_SHARE.value)
  summary = dict(summarize(launches),
                 final_parameters_equal=same_parameters(_WORKDIR.value, reference),
                 config=_CONFIG.value, overrides=_OVERRIDES.value,
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
