"""dbjax.engine.locks: a block's lock file keeps a second job off a block a live job
trains, and a stale lock (an ended process, a restarted container, a silent host, a
file dbjax did not write) is taken over by one job only."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from dbjax.engine.locks import BlockLock
from dbjax.errors import WorkdirError


def _ended_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock(path, **holder):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"host": BlockLock(path, "").mine["host"], "since": "then", "token": "theirs",
               **holder}, f)


def test_a_live_holder_keeps_its_lock(tmp_path):
  path = str(tmp_path / "block_1" / "lock")
  with BlockLock(path, "block 1"):
    assert os.path.exists(path)
    rival = subprocess.run(
        [sys.executable, "-c", "from dbjax.engine.locks import BlockLock; "
         f"BlockLock({path!r}, 'block 1').acquire()"], capture_output=True, text=True)
    assert rival.returncode and (f"block 1 is being trained by the job of pid {os.getpid()}"
                                 in rival.stderr.splitlines()[-1])
  assert not os.path.exists(path)  # released
  _write_lock(path, host="elsewhere", pid=1)  # another host's, touched just now
  with pytest.raises(WorkdirError, match="pid 1 on host elsewhere"):
    BlockLock(path, "block 1").acquire()


@pytest.mark.parametrize("holder", ["ended process", "this pid, another incarnation",
                                    "silent host"])
def test_a_stale_lock_is_taken_over(tmp_path, holder):
  path = str(tmp_path / "lock")
  if holder == "ended process":
    _write_lock(path, pid=_ended_pid())
  elif holder == "this pid, another incarnation":  # a restarted container's pid 1
    _write_lock(path, pid=os.getpid())
  else:
    _write_lock(path, host="elsewhere", pid=1)
    past = time.time() - BlockLock.STALE_SECONDS - 1
    os.utime(path, (past, past))
  with BlockLock(path, "block 0") as lock:
    assert lock.holder()["token"] == lock.mine["token"]
    lock.check()
    _write_lock(path, host="elsewhere", pid=1)  # someone takes it from us
    with pytest.raises(WorkdirError, match="taken over by the job of pid 1 on host elsewhere"):
      lock.check()
  assert os.path.exists(path)  # theirs now: left in place


def test_an_unreadable_lock_is_taken_over_under_a_claim(tmp_path):
  """A lock file dbjax did not write (not JSON) counts as stale, and its takeover is
  claimed under the file's size and time, as a holder's is under its token."""
  path = str(tmp_path / "lock")
  with open(path, "w") as f:
    f.write("not json")
  claimed = BlockLock(path, "block 0")._claim(None)  # pylint: disable=protected-access
  with BlockLock(path, "block 0") as lock:
    lock.check()
    assert os.path.exists(claimed)


def test_one_job_takes_over_a_stale_lock_however_late_its_rival(tmp_path):
  """Two jobs judge the same ended holder stale; the first takes over while the second
  is still deciding. The second gives way, and the lock stays the first's."""
  path = str(tmp_path / "lock")
  _write_lock(path, pid=_ended_pid())
  first, late = BlockLock(path, "block 0"), BlockLock(path, "block 0")
  judged_stale = late.is_stale

  def stale_then_overtaken(holder):
    stale = judged_stale(holder)
    first.acquire()  # while the late job decides
    return stale
  late.is_stale = stale_then_overtaken
  with pytest.raises(WorkdirError, match="stale lock of block 0 .* was taken over by another"):
    late.acquire()
  first.check()
  assert not glob.glob(path + ".*" + late.mine["token"])  # nothing of the late job's left
