r"""Sample from a trained run: any solver, number of steps and guidance scale; or, for a
language run, text with any prompt, temperature and top-p (printed, and written to
<workdir>/generated_<seed>.txt or --out).

  python -m experiments.sample --workdir=runs/digits --num_steps=50 --solver=heun \
      --guidance_scale=2.0 --out=runs/digits/samples_heun.png
  python -m experiments.sample --workdir=runs/shapes --class=triangle
  python -m experiments.sample --workdir=runs/shakespeare --prompt="ROMEO." \
      --temperature=0.8 --top_p=0.9 --num_samples=4

A flag that does not apply to the run's task is refused in one line listing those that do.
"""
from absl import flags

from dbjax import tasks
from dbjax.train import load_run_data, restore_run
from experiments.cli import run, set_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run's directory")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_OUT = flags.DEFINE_string("out", None, "output path (default: <workdir>/samples_<solver>_"
                           "<steps>.png for images, <workdir>/generated_<seed>.txt for text)")
_FLAGS = {
    "num_steps": flags.DEFINE_integer("num_steps", None, "sampling steps; text: denoising "
                                      "calls per token, or MD4 unmasking steps (default: the "
                                      "run's)"),
    "solver": flags.DEFINE_enum("solver", None, ["euler", "heun"],
                                "ODE solver (default: the run's)"),
    "guidance_scale": flags.DEFINE_float("guidance_scale", None,
                                         "classifier-free guidance; 1 = none"),
    "prompt": flags.DEFINE_string("prompt", None, "text: generated text starts with it"),
    "temperature": flags.DEFINE_float("temperature", None,
                                      "text: 0 = greedy (default: the run's)"),
    "top_p": flags.DEFINE_float("top_p", None, "text: nucleus mass, 1 = all (default: 1 if "
                                "--temperature is given, else the run's)"),
    "num_samples": flags.DEFINE_integer("num_samples", None, "text: how many (default: the "
                                        "run's)"),
    "class": flags.DEFINE_string("class", None, "images: every image of the grid of this "
                                 "class, by name (a folder's subfolder) or index"),
    "bridge": flags.DEFINE_enum("bridge", None, ["argmax", "expected"], "text: the chain's "
                                "Euler bridge (default: the run's)"),
}
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  config, task, states, shared = restore_run(_WORKDIR.value)
  values = {name: flag.value for name, flag in _FLAGS.items()}
  if values["prompt"] is not None:
    values["prompt"] = values["prompt"].replace("\\n", "\n")
  if values["temperature"] is not None and values["top_p"] is None:
    values["top_p"] = 1.0  # a temperature alone samples the whole distribution
  config = set_flags(config, task, task.sample_flags, values, "experiments.sample")
  task = tasks.build(config)
  task.check_sample_flags({name: flag.value for name, flag in _FLAGS.items() if flag.present})
  config, data = load_run_data(config, _WORKDIR.value)
  path = task.write_samples(config, _WORKDIR.value, states, shared, data, _SEED.value,
                            _OUT.value)
  if path.endswith(".txt"):
    with open(path, encoding="utf-8") as f:
      print(f.read())
  print(f"wrote {path}")


if __name__ == "__main__":
  run(main)
