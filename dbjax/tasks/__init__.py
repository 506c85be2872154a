"""The task registry: config.task -> the module that builds its Task.

Each module holds one task's networks, shared state, loss, sampler or predictor,
evaluation and the baseline it is compared with, and exposes

  build(config) -> Task            (dbjax.tasks.base.Task: what the engine steps)
  load_data(config, workdir=None) -> (config, RunData)
      the config with data-derived fields filled in; workdir: a trained run's, whose
      saved files (a vocabulary) make the data read as that run read it
  resolve(config) -> config        those fields alone, reading data only if they need it

Adding a task is a module here, an entry below and a config in experiments/configs
(docs/design.md).
"""
import importlib

from dbjax.errors import ConfigError
from dbjax.tasks.base import NoisePlan, RunData, Task

# config.task -> its module (imported on first use).
REGISTRY = {
    "generation": "dbjax.tasks.images",
    "classification": "dbjax.tasks.classification",
    "language": "dbjax.tasks.language",
    "recurrent_depth": "dbjax.tasks.recurrent",
}


def module(name: str):
  """The module of task `name`; ConfigError naming the known tasks if there is none."""
  if name not in REGISTRY:
    raise ConfigError(f"config.task={name!r} is invalid: one of {tuple(REGISTRY)}")
  return importlib.import_module(REGISTRY[name])


def config_sections(name: str) -> dict:
  """{section name: ConfigDict of defaults} that task `name`'s module declares
  (`config_sections()`; none if it has no section of its own)."""
  sections = getattr(module(name), "config_sections", None)
  return sections() if sections is not None else {}


def validate_config(config):
  """The checks config.task's module makes of its own sections (`validate_config`)."""
  check = getattr(module(config.task), "validate_config", None)
  if check is not None:
    check(config)


def build(config, layer=None) -> Task:
  """The Task of a validated config whose data-derived fields are filled in; with a
  user's `layer` factory (dbjax.wrap), the task built around that layer."""
  if layer is None:
    return module(config.task).build(config)
  return module(config.task).build(config, layer=layer)


def resolve(config):
  """The config with its data-derived fields filled in (a text's vocabulary size), reading
  data only where a field needs it: a task's shapes, for profiling, without its data."""
  return module(config.task).resolve(config)


def load_data(config, workdir: str | None = None):
  """(config with data-derived fields filled in, RunData) of a validated config; with
  `workdir`, the data as the run trained there read it."""
  return module(config.task).load_data(config, workdir)


__all__ = ["REGISTRY", "module", "config_sections", "validate_config", "build", "load_data",
           "resolve", "NoisePlan", "RunData", "Task"]
