"""The quick-start notebook runs top to bottom in a real Jupyter kernel (nbclient), with
short training runs, and shows its pictures."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "quickstart.ipynb")


def test_notebook_is_committed_without_outputs():
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] and c["execution_count"] is None for c in cells)


@pytest.mark.slow  # a Jupyter kernel and five short runs, 100 s
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv("DBJAX_NOTEBOOK_STEPS", "2")
  monkeypatch.setenv("DBJAX_CACHE", str(tmp_path / "cache"))
  # The kernel's own inline backend, as in Jupyter and Colab (not a headless one that a
  # test environment may set).
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  pictures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pictures) >= 4  # partition, loss + samples, confusion + accuracy, memory
  text = "".join(o.get("text", "") for o in outputs)
  assert "'iterations': 6" in text and "test accuracy after N steps" in text
  assert "less memory per step" not in text  # that is a plot title, not printed
  assert os.path.exists(tmp_path / "runs" / "quickstart" / "samples.png")
