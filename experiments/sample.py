r"""Sample from a trained run: any solver, number of steps and guidance scale.

  python -m experiments.sample --workdir=runs/digits --num_steps=50 --solver=heun \
      --guidance_scale=2.0 --out=runs/digits/samples_heun.png
"""
import os

import jax
from absl import flags

from dbjax import plots, sampling
from dbjax.train import grid_labels, restore_run
from dbjax.errors import ConfigError
from experiments.cli import run

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run's directory")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "sampling steps (default: the run's)")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver (default: the run's)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "classifier-free guidance; 1 = none")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: <workdir>/samples_<solver>_<n>.png)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  config, model, states, _ = restore_run(_WORKDIR.value)
  if config.task != "generation":
    raise ConfigError(f"{_WORKDIR.value} holds a config.task={config.task!r} run; sampling "
                      "is for generation runs (evaluate it with experiments.evaluate)")
  num_steps = _NUM_STEPS.value or config.sample.num_steps
  solver = _SOLVER.value or config.sample.solver
  guidance = config.sample.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
  images = sampling.sample_in_batches(
      model, sampling.stack_params([s.params for s in states]), jax.random.key(_SEED.value),
      grid_labels(config), num_steps, solver, guidance, batch_size=config.sample.grid_size**2)
  out = _OUT.value or os.path.join(_WORKDIR.value, f"samples_{solver}_{num_steps}.png")
  plots.save_image_grid(images, out, rows=config.sample.grid_size)
  print(f"wrote {out}")


if __name__ == "__main__":
  run(main)
