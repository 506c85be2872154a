"""dbjax.progress: plain lines where the output is a file, compile time kept apart."""
import io

import pytest

from dbjax.progress import progress_bar


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_a_file_gets_a_plain_line_every_five_percent_and_none_with_carriage_returns():
  out = io.StringIO()  # not a terminal
  bar = progress_bar(total=40, desc="training", unit="iteration", file=out)
  for _ in range(40):
    bar.update(1)
  bar.close()
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert len(lines) == 21  # the first update, then each 5%: 2, 4, ..., 40
  assert lines[-1].startswith("training: 100% 40/40 [")


def test_the_first_update_is_reported_as_compilation_and_left_out_of_the_speed():
  out, clock = io.StringIO(), FakeClock()
  bar = progress_bar(total=20, desc="training", unit="iteration", file=out,
                     first_compiles=True)
  bar._time = clock  # tqdm reads its clock through _time
  bar.start_t = bar.last_print_t = clock.now
  clock.now += 7.5  # the first iteration: compile and run
  bar.update(1)
  for _ in range(19):
    clock.now += 0.1  # compiled: ten iterations a second
    bar.update(1)
  assert bar.compile_seconds == 7.5
  assert abs(bar.format_dict["elapsed"] - 1.9) < 1e-9
  rate = (bar.n - bar.initial) / bar.format_dict["elapsed"]
  assert abs(rate - 10) < 1e-6  # without the compile: 20 / 9.4 = 2.1 per second
  bar.close()
  first = out.getvalue().splitlines()[0]
  assert first == "training: compiled in 7.5 s (the first iteration, left out of the speed)"


@pytest.mark.parametrize("done_before", [0, 5])
def test_work_done_before_is_not_the_compilation(done_before):
  """encode_latents counted the rows already encoded (0 on a fresh run) as the first
  update, so it printed "compiled in 0.0 s"; they are counted apart now, and the
  compilation is the first batch that computes."""
  out, clock = io.StringIO(), FakeClock()
  bar = progress_bar(total=20, desc="encoding", unit="image", file=out, first_compiles=True)
  bar._time = clock
  bar.start_t = bar.last_print_t = clock.now
  bar.already_done(done_before)
  assert bar.compile_seconds is None and bar.n == done_before
  clock.now += 3.0
  bar.update(5)
  assert bar.compile_seconds == 3.0 and bar.n == done_before + 5
  bar.close()
  assert "encoding: compiled in 3.0 s" in out.getvalue()


def test_a_disabled_bar_writes_nothing():
  out = io.StringIO()
  bar = progress_bar(total=3, desc="quiet", file=out, disable=True, first_compiles=True)
  bar.update(3)
  bar.close()
  assert out.getvalue() == ""
