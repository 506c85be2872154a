"""Batches read ahead of the step (dbjax.data.prefetch): the same values in the same
order, read ahead in background threads, at most `depth` of them."""
import threading
import time

from dbjax.data.prefetch import prefetched


def recording_read(seen, threads):
  def read(step):
    seen.append(step)
    threads.add(threading.get_ident())
    time.sleep(0.005)
    return [step, step * 10]
  return read


def test_read_ahead_gives_every_step_in_order_bounded_by_depth():
  seen, threads = [], set()
  batches = prefetched(recording_read(seen, threads), range(3, 40), depth=2)
  assert next(batches) == [3, 30]
  time.sleep(0.3)  # the readers run ahead while the "step" runs, then wait
  assert 2 <= len(seen) - 1 <= 3, seen  # read ahead, and no further than depth (+ 1)
  assert list(batches) == [[s, s * 10] for s in range(4, 40)]
  assert sorted(seen) == list(range(3, 40))  # each read once
  assert threading.get_ident() not in threads  # in background threads


def test_depth_zero_reads_each_step_when_asked_in_this_thread():
  seen, threads = [], set()
  batches = prefetched(recording_read(seen, threads), [5, 1, 5], depth=0)
  assert seen == []
  assert next(batches) == [5, 50] and seen == [5]
  assert list(batches) == [[1, 10], [5, 50]]
  assert threads == {threading.get_ident()}


def test_auto_reads_ahead_on_accelerators_only():
  """-1: read ahead where the host's CPUs are free while the devices compute; on the CPU
  backend the readers would compete with the step for the same cores."""
  from dbjax.data.prefetch import AUTO_DEPTH, depth_for  # pylint: disable=g-import-not-at-top
  assert depth_for(-1, "cpu") == 0
  assert depth_for(-1, "gpu") == depth_for(-1, "tpu") == AUTO_DEPTH > 0
  assert depth_for(3, "cpu") == 3 and depth_for(0, "gpu") == 0
