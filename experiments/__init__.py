"""dbjax's command lines (python -m experiments.<name>) and their configs; benchmarks/ and
studies/ hold the rest."""
import os
import signal
import sys


def interrupted_while_starting(signum, frame):
  """Ends the process at once: nothing is written before the command starts, and an
  exception raised inside an import can be swallowed by a bare except, or leave a
  half-loaded native library that crashes the interpreter's shutdown."""
  del signum, frame
  print("interrupted (SIGINT) while starting: nothing was done", file=sys.stderr, flush=True)
  os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access


# Python sets sys.argv[0] to "-m" while it locates the module of `python -m experiments.x`,
# that is, while this package is imported for a command. Ctrl-C in the seconds the
# command then spends importing jax ends it in one line instead of a traceback;
# experiments.cli.one_line_errors puts Python's handler back when the command starts. A
# SIGINT ignored from the start (a job started by nohup) stays ignored.
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
  signal.signal(signal.SIGINT, interrupted_while_starting)
