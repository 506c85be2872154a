"""Errors that dbjax raises for bad configs, bad inputs and numerical faults, and the
warning it gives for settings that run but likely not as meant.

Each message names the field or input, the value it got and what is allowed, so a
user sees one clear line instead of a traceback from deep inside JAX.
"""
import difflib
import warnings


class ConfigError(ValueError):
  """A config field is unknown, of the wrong type or out of range."""


class ConfigWarning(UserWarning):
  """A setting that runs, but likely not as meant (a warmup longer than the updates a
  block gets, a resumed run whose schedule changed)."""


def require(ok: bool, name: str, value, allowed: str):
  """ConfigError "<name>=<value> is invalid: <allowed>" unless ok: the one form of a
  refused setting, for config fields (name "config.train.num_steps") and wrap's
  arguments (name "dbjax.wrap: num_layers") alike."""
  if not ok:
    raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def warn(message: str, stacklevel: int = 3):
  """Issue a ConfigWarning with `message` (one line), attributed to the code
  `stacklevel` - 1 frames above the caller of warn."""
  warnings.warn(message, ConfigWarning, stacklevel=stacklevel)


def nearest(name: str, choices) -> str:
  """" (did you mean 'x'?)" for the choice closest to a misspelt name, or ""."""
  match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


class DataError(ValueError):
  """Input data has the wrong shape, dtype or range, or cannot be found."""


class NonFiniteLossError(FloatingPointError):
  """A block's loss or gradients became NaN or inf; its update was not applied and
  training stopped before saving anything."""

  def __init__(self, step: int, block_index: int, loss: float, grad_norm: float = float("nan"),
               unit: str = "iteration"):
    self.step, self.block_index, self.loss = step, block_index, loss
    super().__init__(
        f"block {block_index} at {unit} {step}: loss {loss}, gradient norm {grad_norm}; its "
        "update was not applied, training stopped and the last good checkpoint was kept "
        "(try a lower train.learning_rate, or train.on_nonfinite='skip' to skip such steps)")


class WorkdirError(OSError):
  """The work directory cannot be written, or holds no run to restore."""


class CheckpointError(OSError):
  """No checkpoint could be read or written (corrupt files, a full disk)."""


class TrainingInterrupted(Exception):
  """A signal (SIGTERM: preemption; SIGINT: Ctrl-C) stopped training within one train
  step, after a checkpoint of exactly the iterations applied."""

  def __init__(self, signal_name: str, step: int, workdir: str, unit: str = "iteration",
               saved: str | None = None):
    """saved: what was saved, in words, where the run's checkpoint is not one step (a
    block job saves each of its blocks)."""
    self.signal_name, self.step = signal_name, step
    saved = saved or (f"after saving the checkpoint of {unit} {step} in {workdir}" if step
                      else f"before any {unit} was applied (nothing to save)")
    super().__init__(f"stopped by {signal_name} {saved}; run the same command to resume")
