"""API reference: every public module, class, function and method of dbjax has a
docstring, and every docs page is linked from the README."""
import importlib
import inspect
import os
import pkgutil

import dbjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_objects():
  for info in pkgutil.walk_packages(dbjax.__path__, "dbjax."):
    module = importlib.import_module(info.name)
    yield module.__name__, module
    for name, obj in vars(module).items():
      if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
        continue
      if inspect.isfunction(obj):
        yield f"{module.__name__}.{name}", obj
      elif inspect.isclass(obj):
        yield f"{module.__name__}.{name}", obj
        for member_name, member in vars(obj).items():
          member = member.fget if isinstance(member, property) else member
          if not member_name.startswith("_") and inspect.isfunction(member):
            yield f"{module.__name__}.{name}.{member_name}", member


def test_every_public_object_has_a_docstring():
  names = [name for name, _ in public_objects()]
  assert "dbjax.wrap.DiffusionBlocks.train_step" in names  # the walk finds methods
  assert "dbjax.tasks.images.ImageGeneration.loss" in names  # ... and subpackages
  # An override of a documented method (a Task's loss, say) inherits its docstring.
  missing = [name for name, obj in public_objects() if not (inspect.getdoc(obj) or "").strip()]
  assert not missing, f"no docstring: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  pages = sorted(os.listdir(os.path.join(ROOT, "docs")))
  assert {"generation.md", "classification.md", "language.md", "user_layers.md"} <= set(pages)
  for page in pages:
    assert f"(docs/{page})" in readme, page


def test_importing_dbjax_leaves_heavy_libraries_for_later():
  """`import dbjax` (a model in someone's code) pays for jax, flax and optax only: the
  checkpoint, logging, plotting and data libraries load where they are used."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  heavy = ["orbax.checkpoint", "tensorboardX", "matplotlib", "scipy", "sklearn",
           "tensorflow_datasets"]
  program = f"import sys, dbjax; print([m for m in {heavy} if m in sys.modules])"
  loaded = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True).stdout.strip()
  assert loaded == "[]"


def _named_result_files(text: str) -> set[str]:
  """The results files a page names, by their path from the repository's root: plain
  names and globs (results/x_*.json), not templates (<device>, {a,b}, $R) nor a
  command's --out=, which names what it will write."""
  import re  # pylint: disable=g-import-not-at-top
  found = re.findall(r"(?<![\w/.=])(?:\.\./)?((?:benchmarks/|studies/)?results/[\w.*-]+)", text)
  return {path for path in found if "." in path.rsplit("/", 1)[-1]}


def test_every_results_file_the_readme_and_docs_name_exists():
  """A figure quoted with its file has the file behind it, under the folder the file's
  command writes to (results/, benchmarks/results/, studies/results/)."""
  import glob  # pylint: disable=g-import-not-at-top
  pages = ["README.md"] + [os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT, "docs"))]
  missing = []
  for page in pages:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
      for path in _named_result_files(f.read()):
        if not glob.glob(os.path.join(ROOT, path)):
          missing.append(f"{page}: {path}")
  assert len(_named_result_files("`results/a.json`, ../studies/results/b.png, results/")) == 2
  assert not missing, missing
