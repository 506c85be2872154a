"""Errors that dbjax raises for bad configs, bad inputs and numerical faults.

Each message names the field or input, the value it got and what is allowed, so a
user sees one clear line instead of a traceback from deep inside JAX.
"""


class ConfigError(ValueError):
  """A config field is unknown, of the wrong type or out of range."""


class DataError(ValueError):
  """Input data has the wrong shape, dtype or range, or cannot be found."""


class NonFiniteLossError(FloatingPointError):
  """A block's loss became NaN or inf; training stopped before saving it."""

  def __init__(self, step: int, block_index: int, loss: float):
    self.step, self.block_index, self.loss = step, block_index, loss
    super().__init__(
        f"loss of block {block_index} is {loss} at step {step}; training stopped "
        "and the last good checkpoint was kept (try a lower train.learning_rate)")


class WorkdirError(OSError):
  """The work directory cannot be written, or holds no run to restore."""
