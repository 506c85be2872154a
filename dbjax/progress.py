"""Progress bars for long work, readable on a terminal, in a notebook and in a log file.

`progress_bar` is tqdm (tqdm.auto: a widget in a notebook) with two changes:
- Where the output is not a terminal (a log file, a pipe, a batch job's output), it
  writes a plain line every `every_percent` percent (and at the end) instead of
  redrawing one line with carriage returns, which a file keeps as one long line.
- With first_compiles=True, the first update is taken as compilation: its time is
  reported on a line of its own ("compiled in 7.5 s") and left out of the speed, which
  then counts the compiled steps only.
"""
import sys

import tqdm.auto
import tqdm.std

# A plain line at least this often, in percent of the total.
EVERY_PERCENT = 5
# Without a total (an unknown length), a plain line every this many updates.
EVERY_UPDATES = 100
# A plain line: tqdm's figures without the bar's block characters.
PLAIN_FORMAT = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def is_terminal(stream) -> bool:
  """Whether `stream` is a terminal (not a file, a pipe or a closed stream)."""
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def _in_notebook() -> bool:
  """Whether tqdm.auto chose its notebook widget (it imports tqdm.notebook only then)."""
  return any(c.__module__ == "tqdm.notebook" for c in tqdm.auto.tqdm.__mro__)


class _Discard:
  """A stream that keeps nothing: tqdm draws its bar here in plain-line mode."""

  def write(self, text):
    del text

  def flush(self):
    pass


class ProgressBar(tqdm.auto.tqdm):
  """tqdm with plain lines off a terminal and compile time kept out of the speed (see the
  module docstring)."""

  def __init__(self, *args, first_compiles: bool = False, every_percent: float = EVERY_PERCENT,
               **kwargs):
    out = kwargs.pop("file", None) or sys.stderr
    notebook = _in_notebook()
    self.plain = not notebook and not is_terminal(out)
    self._out, self._every = out, every_percent
    self._first_compiles, self._last_line = first_compiles, None
    self.compile_seconds = None
    if self.plain:
      kwargs["file"], kwargs["mininterval"] = _Discard(), 0
    elif not notebook:
      kwargs["file"] = out
    super().__init__(*args, **kwargs)
    if self.disable:  # tqdm set up nothing more
      return
    if self.plain and self.total and self.desc:
      self.bar_format = PLAIN_FORMAT

  def update(self, n=1):
    if self.disable:
      return None
    if self._first_compiles and self.compile_seconds is None:
      self._end_compilation(n)
      return True
    shown = super().update(n)
    if self.plain and self._line_due():
      self._write_line()
    return shown

  def already_done(self, n: int):
    """Count n units done before this run (a resumed job's, a file already written):
    no work, so neither the compilation nor the speed; the next update is still the
    first that computes."""
    if self.disable or not n:
      return
    self.n += n
    self.initial, self.last_print_n = self.n, self.n
    self.refresh()

  def _end_compilation(self, n):
    """Count the first update's n, report its time as compilation and restart the speed
    from now (tqdm's rate: (n - initial) / elapsed, or its moving averages)."""
    now = self._time()
    self.compile_seconds = now - self.start_t
    self.n += n
    self.initial, self.last_print_n = self.n, self.n
    self.start_t = self.last_print_t = now
    self._ema_dn, self._ema_dt = tqdm.std.EMA(self.smoothing), tqdm.std.EMA(self.smoothing)
    self.write(f"{self.desc}{': ' if self.desc else ''}compiled in "
               f"{self.compile_seconds:.1f} s (the first {self.unit}, left out of the speed)",
               file=self._out)
    if self.plain:
      self._write_line()
    else:
      self.refresh()

  def _line_due(self) -> bool:
    if self._last_line is None:
      return True
    if not self.total:
      return self.n - self._last_line >= EVERY_UPDATES
    step = max(self.total * self._every / 100, 1)
    return self.n // step > self._last_line // step or self.n >= self.total

  def _write_line(self):
    if self._last_line == self.n:
      return
    self._last_line = self.n
    self._out.write(self.__str__() + "\n")
    self._out.flush()

  def close(self):
    if self.plain and not self.disable:
      self._write_line()  # the final count, if the last update did not write it
    super().close()


def progress_bar(*args, **kwargs) -> ProgressBar:
  """A ProgressBar (tqdm's arguments, plus first_compiles and every_percent)."""
  return ProgressBar(*args, **kwargs)
