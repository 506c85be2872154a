"""The README's Python snippet runs as written (with a shorter schedule)."""
import os
import re

import chex

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("DBJAX_CACHE", str(tmp_path / "cache"))
  with open(README) as f:
    snippet = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
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
