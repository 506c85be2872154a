"""The quick-start notebook runs top to bottom (its code cells, in order)."""
import json
import os

import matplotlib
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("DBJAX_NOTEBOOK_STEPS", "2")
  monkeypatch.setenv("DBJAX_CACHE", str(tmp_path / "cache"))
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] for c in cells), "commit the notebook without outputs"
  namespace = {}
  for cell in cells:
    exec(compile("".join(cell["source"]), NOTEBOOK, "exec"), namespace)
  assert namespace["results"]["iterations"] == 6
  assert os.path.exists(tmp_path / "runs" / "quickstart" / "samples.png")
  assert set(namespace["classifier_results"]["accuracy_by_steps"]) == {"1", "2", "3", "6", "12"}
