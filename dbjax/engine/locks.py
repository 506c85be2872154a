"""The lock file that keeps a second job off a block (or the assembly) a live job holds,
on one host or across hosts on a shared filesystem (dbjax.engine.block_jobs)."""
import contextlib
import json
import os
import socket
import threading
import time
import uuid

from dbjax.errors import WorkdirError


class BlockLock:
  """A lock file naming the job that trains a block: {"host", "pid", "token"}.

  Taken atomically (a hard link of a complete file, which fails if the lock exists, also
  on NFS). A lock is stale, and taken over, when its holder is on this host and its
  process is gone (or is this process's pid, a restarted container's), or when its
  holder has not touched it for STALE_SECONDS (another host's job that died: holders
  touch it every HEARTBEAT_SECONDS). A takeover first claims the stale holder (a hard
  link named by its token, created once), then renames over the lock: of the jobs that
  judge the same holder stale, however late, one takes over and the others give way. A
  holder checks the lock is still its own before each save. The claims are left beside
  the lock, one small file per takeover, so that a late rival still finds them.
  """
  HEARTBEAT_SECONDS = 30.0
  STALE_SECONDS = 300.0

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    self._stop_heartbeat = threading.Event()

  def holder(self) -> dict | None:
    """The lock's content, or None when there is no lock (or it is being replaced)."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def is_stale(self, holder: dict) -> bool:
    """Whether `holder`, the lock's content, has ended (see the class docstring)."""
    try:
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return True
    if age > self.STALE_SECONDS:
      return True
    if holder.get("host") != self.mine["host"]:
      return False
    if holder.get("pid") == os.getpid():  # not ours (other token): a former incarnation
      return True
    try:
      os.kill(holder["pid"], 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # alive, another user's
      pass
    return False

  def _written(self) -> str:
    """A complete file with our content beside the lock, to link or rename into place."""
    partial = f"{self.path}.{self.mine['token']}"
    with open(partial, "w") as f:
      json.dump(self.mine, f)
    return partial

  def acquire(self):
    """Take the lock, or a stale one over; WorkdirError naming a live holder."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    partial = self._written()
    try:
      while True:
        try:
          os.link(partial, self.path)
          return
        except FileExistsError:
          pass
        holder = self.holder()
        try:
          claim = self._claim(holder)
          break
        except FileNotFoundError:  # released since the link failed: link again
          continue
      if holder and not self.is_stale(holder):
        raise WorkdirError(
            f"{self.what} is being trained by the job of pid {holder.get('pid')} on host "
            f"{holder.get('host')} (since {holder.get('since')}; lock {self.path}): "
            "leave it to that job, or remove the lock if you know it has ended")
      try:
        os.link(partial, claim)
      except FileExistsError:
        raise WorkdirError(
            f"the stale lock of {self.what} ({self.path}) was taken over by another job: "
            "leave it to that job") from None
      os.replace(partial, self.path)
      self.check()
    finally:
      if os.path.exists(partial):
        os.remove(partial)

  def _claim(self, holder: dict | None) -> str:
    """The path whose creation claims the takeover of `holder` (None: an unreadable lock,
    named by its size and time; FileNotFoundError if it is gone)."""
    if holder and "token" in holder:
      return f"{self.path}.taken_from.{holder['token']}"
    stat = os.stat(self.path)
    return f"{self.path}.taken_from.unreadable_{stat.st_size}_{stat.st_mtime_ns}"

  def check(self):
    """WorkdirError unless the lock is still ours."""
    holder = self.holder() or {}
    if holder.get("token") != self.mine["token"]:
      raise WorkdirError(
          f"the lock of {self.what} ({self.path}) was taken over by the job of pid "
          f"{holder.get('pid')} on host {holder.get('host')}: this job stops without "
          "writing over its work")

  def _heartbeat(self):
    while not self._stop_heartbeat.wait(self.HEARTBEAT_SECONDS):
      with contextlib.suppress(OSError):
        if (self.holder() or {}).get("token") == self.mine["token"]:
          os.utime(self.path)

  def __enter__(self):
    self.acquire()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *_):
    self._stop_heartbeat.set()
    if (self.holder() or {}).get("token") == self.mine["token"]:
      os.remove(self.path)
