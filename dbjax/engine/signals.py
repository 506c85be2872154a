"""Stopping a run cleanly on a signal: SIGTERM (how schedulers preempt a job) and Ctrl-C
let the driver finish its train step and checkpoint, on every process of a run alike."""
import contextlib
import signal
import sys
import threading

import jax
import numpy as np


class StopOnSignals:
  """Within it, SIGTERM (how schedulers preempt a job) and a first SIGINT (Ctrl-C, a
  Jupyter interrupt) set `.signal_name` instead of ending the process, so the driver can
  checkpoint within one train step and stop; a second SIGINT aborts at once
  (KeyboardInterrupt), leaving the previous checkpoint as it is. Only the main thread
  can take signals; elsewhere this does nothing."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name = None

  def __enter__(self):
    self._installed = threading.current_thread() is threading.main_thread()
    if self._installed:
      # A signal ignored when we start (SIGINT of a job started in the background, by
      # nohup) stays ignored, as Python itself leaves it.
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                        if signal.getsignal(s) is not signal.SIG_IGN}
    return self

  def _handle(self, signum, _):
    if signum == signal.SIGINT and self.signal_name == "SIGINT":
      raise KeyboardInterrupt  # the second Ctrl-C
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("SIGINT: stopping after this train step with a checkpoint (Ctrl-C again to "
            "abort without one)", file=sys.stderr, flush=True)

  def __exit__(self, *_):
    if self._installed:
      for s, handler in self._previous.items():
        signal.signal(s, handler)


def agreed_stop(stop: StopOnSignals):
  """should_stop() for a run: whether a signal asked this process to stop, or, on many
  processes, any of them (a small all-gather of the signal numbers at each call, so that
  every process stops after the same train step, saves the same checkpoint and ends
  with the same signal's status). Every process must call it at the same points."""
  if jax.process_count() == 1:
    return lambda: stop.signal_name is not None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def should_stop() -> bool:
    mine = signal.Signals[stop.signal_name].value if stop.signal_name else 0
    agreed = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    if agreed and stop.signal_name is None:
      stop.signal_name = signal.Signals(agreed).name
    return bool(agreed)
  return should_stop


_ACTIVE_STOP = []  # the StopOnSignals in force, if any


@contextlib.contextmanager
def stop_on_signals():
  """StopOnSignals for the work within (loading data, compiling, training), or the one
  an enclosing `with stop_on_signals()` already installed: a signal that arrives before
  training starts stops it before its first iteration."""
  if _ACTIVE_STOP:
    yield _ACTIVE_STOP[-1]
    return
  with StopOnSignals() as stop:
    _ACTIVE_STOP.append(stop)
    try:
      yield stop
    finally:
      _ACTIVE_STOP.pop()
