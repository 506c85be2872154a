"""Eight fake CPU devices for the multi-device test modules (test_parallel, test_mesh).

XLA reads XLA_FLAGS when the backend starts, which is at the first computation, so
calling start() at a module's import, before anything computes, is in time as long as
no test module collected before it computes at import. The environment is put back
afterwards, so that the command-line tests' child processes see their usual one device.
"""
import os

import jax


def start(count: int = 8) -> int:
  """Start the backend with `count` fake CPU devices; the device count it started with."""
  saved = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = f"{saved or ''} --xla_force_host_platform_device_count={count}"
  try:
    return jax.device_count()
  finally:
    if saved is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = saved


def require(count: int, started: int):
  """A module fixture's check that the backend did start with `count` devices."""
  assert started == count, (
      "the CPU backend started before this module set XLA_FLAGS: some module computes "
      "at import")

