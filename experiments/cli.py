"""What every entry point shares: the list of configs, and one-line errors."""
import functools
import glob
import os
import sys

from dbjax.errors import ConfigError, DataError, NonFiniteLossError, WorkdirError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
USER_ERRORS = (ConfigError, DataError, NonFiniteLossError, WorkdirError)


def available_configs() -> list[str]:
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIG_DIR, "[!_]*.py")))


def config_help() -> str:
  return "experiment config file, one of: " + ", ".join(available_configs())


def one_line_errors(main):
  """Report a bad config, bad data or a numerical fault as one line, exit status 2."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except AttributeError as e:  # ml_collections: a typo in a locked config's field
      if "locked" in str(e) or "not exist" in str(e):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
      raise
  return wrapped


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
