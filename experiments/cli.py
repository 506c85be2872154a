"""What every entry point shares: the list of configs, one-line errors around absl's
app.run, config variants (by method, or one field from text) and a plain table printer."""
import functools
import glob
import json
import os
import signal
import sys
import warnings

import jax
from absl import app, logging

from dbjax import tasks
from dbjax.config import field_holder, validate
from dbjax.errors import (CheckpointError, ConfigError, ConfigWarning, DataError,
                          NonFiniteLossError, TrainingInterrupted, WorkdirError)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
USER_ERRORS = (CheckpointError, ConfigError, DataError, NonFiniteLossError, WorkdirError)


def available_configs() -> list[str]:
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIG_DIR, "[!_]*.py")))


def config_help() -> str:
  return "experiment config file, one of: " + ", ".join(available_configs())


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None,
                  _default=warnings.showwarning):
  """dbjax's ConfigWarnings as one line on stderr; other warnings as Python shows them."""
  if issubclass(category, ConfigWarning):
    print(f"warning: {message}", file=sys.stderr if file is None else file)
  else:
    _default(message, category, filename, lineno, file, line)


def one_line_errors(main):
  """Report a bad config, bad data or a numerical fault as one line, exit status 2."""
  @functools.wraps(main)
  def wrapped(argv):
    warnings.showwarning = _show_warning
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      return main(argv)
    except USER_ERRORS as e:
      _fail(str(e))
    except TrainingInterrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(128 + signal.SIGTERM)  # the status of a process ended by SIGTERM
  return wrapped


def run(main):
  """absl's app.run, with one-line errors also for config typos in --config.* flags,
  which ml_collections reports while the flags are parsed, before main runs."""
  try:
    app.run(one_line_errors(main))
  except AttributeError as e:
    text = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "").strip("'")
    _fail(f"unknown config field in a --config override: {text}")


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize, before any computation; on localhost CPUs (tests,
  laptops) the gloo collectives are jax's default."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices")


def method_variant(base_config, method: str, **diffusion_and_model_overrides):
  """A validated copy of `base_config` trained by `method` (data-derived fields filled
  in), and its task.

  Overrides are given as section__field=value, e.g. diffusion__num_blocks=4.
  """
  config = base_config.copy_and_resolve_references()
  config.method = method
  for dotted, value in diffusion_and_model_overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  config = tasks.resolve(validate(config))
  return config, tasks.build(config)


def with_field(config, dotted: str, text: str):
  """A copy of config with field `dotted` set from `text`, parsed as the field's type."""
  config = config.copy_and_resolve_references()
  holder, name = field_holder(config, dotted)
  kind = type(holder[name])
  holder[name] = (text.lower() in ("1", "true")) if kind is bool else kind(text)
  return validate(config)


def set_flags(config, task, flag_fields: dict, values: dict, command: str):
  """A copy of config with each given flag's field set (task.evaluate_flags or
  task.sample_flags: flag -> dotted field); a flag the task does not take is one line."""
  config = config.copy_and_resolve_references()
  for flag, value in values.items():
    if value is None:
      continue
    if flag not in flag_fields:
      raise ConfigError(f"--{flag} does not apply to a config.task={config.task!r} run "
                        f"({type(task).__name__}); {command} takes: "
                        + ", ".join(f"--{f}" for f in flag_fields))
    holder, name = field_holder(config, flag_fields[flag])
    holder[name] = (value,) if isinstance(holder[name], tuple) else value
  return validate(config)


def summary_columns(task, results) -> dict:
  """The task's summary metrics that are numbers (a dict is flattened by its keys)."""
  columns = {}
  for name in task.summary_metrics:
    value = results.get(name)
    if isinstance(value, dict):
      columns.update({f"{name}@{k}": v for k, v in value.items()})
    elif value is not None:
      columns[name] = value
  return columns


def write_json(path: str, summary: dict):
  """Write a benchmark's summary to `path` (folders made as needed) and say so."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]):
  """A plain aligned table on stdout."""
  cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)
