"""A run's saved config.json as a config file. experiments.cli routes
--config=<workdir>/config.json here (and --workdir alone, where the run saved one), the
path after the colon as ml_collections passes a config file's argument."""
import json

from dbjax.config import from_saved


def get_config(path: str):
  with open(path, encoding="utf-8") as f:
    return from_saved(json.load(f))
