"""What every entry point shares: the list of configs, one-line errors around absl's
app.run, config variants (by method, or one field from text) and a plain table printer."""
import functools
import glob
import json
import os
import signal
import sys
import textwrap
import warnings

import jax
from absl import app, flags, logging

import experiments
from dbjax import tasks
from dbjax.config import default_config, fields_by_task, field_holder, flatten, validate, variant
from dbjax.errors import (CheckpointError, ConfigError, ConfigWarning, DataError,
                          NonFiniteLossError, TrainingInterrupted, WorkdirError, nearest)

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


class Terminated(Exception):
  """SIGTERM outside training (where the driver saves and stops on its own)."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated


def one_line_errors(main):
  """Report a bad config, bad data or a numerical fault as one line, exit status 2;
  a stop by SIGTERM or SIGINT as one line, exit status 143 or 130."""
  @functools.wraps(main)
  def wrapped(argv):
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is experiments.interrupted_while_starting:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # handled below
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      return main(argv)
    except USER_ERRORS as e:
      _fail(str(e))
    except TrainingInterrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(128 + signal.Signals[e.signal_name])  # the status of a process it ended
    except (KeyboardInterrupt, Terminated) as e:  # outside training, or a second Ctrl-C
      name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
      print(f"interrupted ({name}): what was saved stays; run the same command to resume "
            "training or redo its evaluation", file=sys.stderr)
      sys.exit(128 + signal.Signals[name])
  return wrapped


def _config_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
  """(the --config file, the dotted fields of the --config.<field> overrides) in argv."""
  fields = [a.partition("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
  return _argument_value(argv, "--config"), fields


def check_config_arguments(argv: list[str]):
  """One line, before absl parses anything, for a --config file that does not exist
  and an override of a field no config has, each with the nearest valid choice."""
  path, fields = _config_arguments(argv)
  if path is not None and not os.path.isfile(path.split(":", 1)[0]):
    _fail(f"--config={path}: no such file{nearest(path, available_configs())}; the "
          f"configs are: {', '.join(available_configs())}")
  by_task = fields_by_task()
  known = list(dict.fromkeys(field for fields in by_task.values() for field in fields))
  given_task = _argument_value(argv, "--config.task")
  file_task = _task_of_config_file(path) if path is not None else ""
  if given_task and file_task and given_task != file_task:
    _fail(f"--config.task={given_task}: {path} is a config.task={file_task!r} config, and "
          "each task's config has its own sections; start from a config file of task "
          f"{given_task!r} (experiments/configs/)")
  task = given_task or file_task
  # Without --config or --config.task the command's own default file applies, which is
  # not known here: absl then names a field that config lacks.
  own = by_task.get(task, known)
  for field in fields:
    if field not in known:
      section = field.rpartition(".")[0]
      siblings = [f for f in known if f.rpartition(".")[0] == section]
      _fail(f"--config.{field}: no such config field{nearest(field, known)}; "
            + (f"the fields of config.{section} are: {', '.join(siblings)}" if siblings
               else "--help lists them all"))
    if field not in own:
      owners = [t for t, fields in by_task.items() if field in fields]
      _fail(f"--config.{field}: a field of the config of task "
            f"{' and '.join(repr(t) for t in owners)}, not of this config.task={task!r} "
            "run's; its sections: "
            + ", ".join(sorted({f.partition('.')[0] for f in own if '.' in f})))


def _task_of_config_file(path: str) -> str:
  """config.task of the --config file (its get_config run here, before absl loads it),
  or "" where it does not load."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  file_name, _, argument = path.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_config_file", file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (module.get_config(argument) if argument else module.get_config()).task
  except Exception:  # pylint: disable=broad-exception-caught
    return ""  # absl reports a config file that does not load, in its own words


def config_fields_help(config=None) -> str:
  """Every field of `config` with its value, a line per section, for --help; without a
  config, the fields every run has and each task's own sections, at their defaults."""
  if config is not None:
    source, fields = "this config's values", flatten(config.to_dict())
  else:
    source, fields = "the defaults; a task's own sections only in its runs", {}
    for task_fields in fields_by_task().values():
      fields.update(task_fields)
    fields["task"] = default_config().task
  lines = ["", f"Config fields, set with --config.<field>=<value> ({source}; docs: the "
           "comments in dbjax/config.py and the task modules' config_sections):"]
  sections = {}
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    sections.setdefault(section, []).append(f"{name}={value!r}")
  for section, values in sections.items():
    lines.append(textwrap.fill(", ".join(values), width=100, initial_indent="  "
                               + (f"{section}: " if section else ""),
                               subsequent_indent="      "))
  return "\n".join(lines)


# absl's help flags; each prints the usage and exits (status 1 in absl: 0 here).
HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")
# Loads a run's config.json as a config file (ml_collections passes what follows ':').
SAVED_RUN_CONFIG = os.path.join(CONFIG_DIR, "_saved_run.py")


def _asks_for_help(argv: list[str]) -> bool:
  return any(a.split("=")[0] in HELP_FLAGS for a in argv)


def _argument_value(argv: list[str], flag: str) -> str | None:
  """The value of --flag=value or --flag value in argv (the last one given), or None."""
  value = None
  for i, argument in enumerate(argv):
    name, has_value, text = argument.partition("=")
    if name == flag:
      value = text if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _without(argv: list[str], flag: str) -> list[str]:
  """argv without --flag=value or --flag value."""
  kept, skip = [], False
  for argument in argv:
    if skip:
      skip = False
    elif argument == flag:
      skip = True
    elif not argument.startswith(flag + "="):
      kept.append(argument)
  return kept


def with_run_config(argv: list[str], required: bool) -> list[str]:
  """argv with the config a run saved made a config file: --config=<workdir>/config.json
  loads it, and --workdir alone (no --config) continues the run in that workdir with its
  own config. --config.<field> overrides apply on top either way. required: whether the
  command has no default config (then a missing one is a one-line error)."""
  path = _argument_value(argv, "--config")
  if path is None:
    workdir = _argument_value(argv, "--workdir")
    saved = os.path.join(workdir, "config.json") if workdir else None
    if saved is not None and os.path.isfile(saved):
      print(f"continuing the run in {workdir} with its saved config ({saved})",
            file=sys.stderr)
      path = saved
    elif required and not _asks_for_help(argv):
      where = (f"--workdir={workdir} holds no config.json of a run to continue" if workdir
               else "no --workdir of a run to continue")
      _fail(f"--config: not given, and {where}; give --config=<file>, one of: "
            f"{', '.join(available_configs())}, or a run's config.json")
    else:
      return argv
  if path.endswith(".json"):
    if not os.path.isfile(path):
      _fail(f"--config={path}: no such file")
    try:
      with open(path, encoding="utf-8") as f:
        json.load(f)
    except (OSError, ValueError) as e:
      _fail(f"--config={path}: not a run's config.json ({e})")
    path = f"{SAVED_RUN_CONFIG}:{path}"
  # Before the overrides: ml_collections applies --config.<field> to the config loaded.
  return [f"--config={path}"] + _without(argv, "--config")


def _config_for_help(argv: list[str]):
  """The config that --config in argv names, for --help; None if none or unreadable."""
  path = _argument_value(argv, "--config")
  if path is None or not os.path.isfile(path.split(":", 1)[0]):
    return None
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.ConfigFileFlagParser("config").parse(path)
  except Exception:  # pylint: disable=broad-except  (help shows the defaults instead)
    return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad flag value being one line and exit status 2 (a usage
  error, as argparse and the shell's tools have it; absl exits 1 with a FATAL line)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(" ".join(str(e).split()))
  except AttributeError as e:  # a --config override typo check_config_arguments missed
    text = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "").strip("'")
    _fail(f"unknown config field in a --config override: {text}")


def run(main):
  """absl's app.run, with command-line behaviour as tools have it: usage errors (a missing
  --config file, config typos in --config.* flags, a bad flag value) one line and exit
  status 2; --help and --helpshort exit 0 and list every config field with the values of
  the config given (or the defaults); a run's config.json is a config file, and --workdir
  alone continues the run there (`with_run_config`)."""
  argv = list(sys.argv)
  module = sys.modules.get(main.__module__)
  if module is not None and "--config" in _flag_names():
    argv[1:] = with_run_config(argv[1:], required=flags.FLAGS["config"].default is None)
    if _asks_for_help(argv[1:]):  # the config is read for the listing only then
      module.__doc__ = (module.__doc__ or "") + config_fields_help(_config_for_help(argv[1:]))
    check_config_arguments(argv[1:])
  sys.argv = argv
  enable_compilation_cache()
  try:
    app.run(one_line_errors(main), flags_parser=_parse_flags)
  except SystemExit as e:
    if e.code == 1 and _asks_for_help(argv[1:]):
      sys.exit(0)  # absl's help flags exit 1 after printing the help
    raise


def _flag_names() -> set:
  return {f"--{name}" for name in flags.FLAGS}


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize, before any computation; on localhost CPUs (tests,
  laptops) the gloo collectives are jax's default."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices")


def method_variant(base_config, method: str, **diffusion_and_model_overrides):
  """(dbjax.config.variant of `base_config` trained by `method`, its task)."""
  config = variant(base_config, method, **diffusion_and_model_overrides)
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


def write_json(path: str, summary: dict, quiet: bool = False):
  """Write a benchmark's summary to `path` (folders made as needed) and say so. Written
  to a temporary file and renamed, so a kill never leaves half a file: a script that
  rewrites it after every row keeps every finished row."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(path + ".tmp", path)
  if not quiet:
    print(f"wrote {path}")


def compilation_cache_dir() -> str | None:
  """Where every command keeps JAX's persistent compilation cache: $JAX_COMPILATION_CACHE_DIR
  if set, else $DBJAX_COMPILATION_CACHE, else <$DBJAX_CACHE or ~/.cache/dbjax>/
  jax_compilation_cache; None when DBJAX_COMPILATION_CACHE=off."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  chosen = os.environ.get("DBJAX_COMPILATION_CACHE", "")
  if chosen.lower() == "off":
    return None
  return chosen or os.path.join(
      os.environ.get("DBJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dbjax")),
      "jax_compilation_cache")


def enable_compilation_cache():
  """JAX's persistent compilation cache, on in every command: a second run of the same
  program (the same config on the same device and jax) loads its compiled steps from
  disk instead of compiling them (docs/history.md, "JAX's persistent compilation cache",
  says how much that saves). Programs that compile in under a second are not cached
  (jax's default)."""
  directory = compilation_cache_dir()
  if directory is not None:
    jax.config.update("jax_compilation_cache_dir", directory)


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
