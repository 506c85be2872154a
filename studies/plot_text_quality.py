r"""Curves of sample quality against K from several experiments.text_quality outputs, one
line per model (e.g. DiffusionBlocks against Huginn over inference iterations).

  R=results/text_quality_shakespeare_recurrent; python -m studies.plot_text_quality \
      --curve="DiffusionBlocks=${R}_db_seed0.json,${R}_db_seed0_k16.json" \
      --curve="Huginn=${R}_huginn_seed0.json" \
      --out=studies/results/text_quality_shakespeare_recurrent

Each --curve is LABEL=FILE[,FILE...]: the files' rows are one model's cells, merged by K
(a K scored in two files is refused: which is the curve's would be a guess). All files
must share their sampling settings (judge, prompts, lengths, temperature, top-p, seed), so
the lines compare like with like. Writes <out>_<measure>.png for MAUVE, generative bits
per character and distinct-2, and prints the merged table.
"""
import json
import os

from absl import flags

from dbjax.errors import ConfigError
from dbjax.eval import text_quality
from experiments.cli import print_table, run

_CURVES = flags.DEFINE_multi_string("curve", None, "LABEL=FILE[,FILE...] of text_quality "
                                    "JSON outputs; one line each")
_OUT = flags.DEFINE_string("out", None, "path prefix of the plots")
flags.mark_flags_as_required(["curve", "out"])

# The settings two cells must share to be on one plot (text_quality's JSON keys).
SHARED_SETTINGS = ("judge", "num_samples", "prompt_length", "length", "temperature", "top_p",
                   "seed")


def parse_curve(spec: str) -> tuple[str, list[str]]:
  """'LABEL=a.json,b.json' -> ('LABEL', ['a.json', 'b.json']); split at the last '=', so
  a label may hold one ('sigma_max_share=0.5') and the file names may not."""
  label, sep, files = spec.rpartition("=")
  if not sep or not label or not files:
    raise ConfigError(f"--curve={spec}: expected LABEL=FILE[,FILE...]")
  return label, files.split(",")


def merged_cells(outputs: list[dict], label: str) -> dict:
  """{K: row} of one model's text_quality outputs; a K twice is an error."""
  cells = {}
  for output in outputs:
    for row in output["rows"]:
      if row["num_steps"] in cells:
        raise ConfigError(f"--curve={label}: K = {row['num_steps']} is in two of its files")
      cells[row["num_steps"]] = row
  return cells


def check_same_settings(outputs: dict):
  """ConfigError naming the setting and the two files where the outputs disagree."""
  (first_path, first), *rest = outputs.items()
  for path, output in rest:
    for key in SHARED_SETTINGS:
      if output[key] != first[key]:
        raise ConfigError(f"{path} was scored with {key}={output[key]!r} and {first_path} "
                          f"with {first[key]!r}: one plot compares like with like")


def main(argv):
  del argv
  curves, outputs = {}, {}
  for spec in _CURVES.value:
    label, paths = parse_curve(spec)
    for path in paths:
      if not os.path.isfile(path):
        raise ConfigError(f"--curve={spec}: {path} does not exist")
      with open(path) as f:
        outputs[path] = json.load(f)
    curves[label] = merged_cells([outputs[p] for p in paths], label)
  check_same_settings(outputs)
  measures = text_quality.CURVE_MEASURES
  rows = [{"model": label, "K": k, **{m: cells[k][m] for m in measures}}
          for label, cells in curves.items() for k in sorted(cells)]
  print_table(rows, ["model", "K", *measures])
  for path in text_quality.save_curves(curves, _OUT.value):
    print(f"wrote {path}")


if __name__ == "__main__":
  run(main)
