"""The README's Python snippet runs as written (with a shorter schedule)."""
import os
import re

import chex
import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_snippets() -> list[str]:
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.slow  # four tasks built, trained and sampled from scratch, 100 s
def test_readme_python_snippet_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("DBJAX_CACHE", str(tmp_path / "cache"))
  snippet = python_snippets()[0]
  assert "config.train.num_steps = 300" in snippet
  snippet = snippet.replace("config.train.num_steps = 300",
                            "config.train.num_steps = 2; config.eval.num_samples = 100; "
                            "config.eval.classifier_steps = 20; config.model.num_layers = 3")
  # Fewer layers compile faster; the shapes the test checks do not depend on them.
  assert "config.language.seq_len = 64" in snippet
  snippet = snippet.replace("config.language.seq_len = 64",
                            "config.language.seq_len = 64; config.model.num_layers = 3")
  namespace = {}
  exec(compile(snippet, README, "exec"), namespace)
  assert namespace["results"]["iterations"] == 6
  assert float(namespace["metrics"]["loss"]) > 0
  chex.assert_shape(namespace["images"], (10, 8, 8, 1))
  chex.assert_shape(namespace["predicted"], (10,))
  assert float(namespace["metrics"]["cross_entropy"]) > 0
  chex.assert_shape(namespace["ids"], (2, 64))


def test_readme_wrap_snippet_runs_exactly_as_written(tmp_path, monkeypatch):
  """Issue 6: the under-30-line snippet that wraps a user's layer, unchanged."""
  monkeypatch.chdir(tmp_path)
  snippet, = [s for s in python_snippets() if "dbjax.wrap(" in s]
  assert len(snippet.strip().splitlines()) < 30
  namespace = {}
  exec(compile(snippet, README, "exec"), namespace)
  assert np.isfinite(float(namespace["metrics"]["loss"]))
  for name in ("images", "e2e_images"):
    chex.assert_shape(namespace[name], (10, 8, 8, 1))
    chex.assert_tree_all_finite(namespace[name])
  trained = [state.params for state in namespace["states"]]
  # Back from the end-to-end network, and from disk, every block is as it was.
  chex.assert_trees_all_equal(namespace["params"], trained)
  assert os.path.isdir(tmp_path / "runs" / "my_blocks")
