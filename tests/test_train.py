"""Training runs end to end (dbjax.train): loss that falls, resume, faults, outputs."""
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

import dbjax
from dbjax import data, tasks, train
from dbjax.errors import ConfigError, ConfigWarning, NonFiniteLossError, WorkdirError
from dbjax.tasks.images import ImageGeneration
from tests.conftest import tiny_config
from tests.test_metric_log import read_scalars, read_tags


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_falls_on_a_short_run(tmp_path, digits, dtype):
  config = tiny_config()
  config.model.dtype = dtype  # bfloat16: tests/test_precision.py
  config.train.num_steps = 150
  config.train.checkpoint_every = 300
  config.train.learning_rate = 2e-3
  _, _, _, history = train.train(config, str(tmp_path), digits)
  for b in range(2):
    losses = [r["loss"] for r in history if r["block"] == b]
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15]), b


def test_end_to_end_is_one_block_with_the_whole_range(tmp_path, digits):
  config = tiny_config(method="end_to_end")
  model = tasks.build(config)
  assert model.num_blocks == 1 and model.dit.num_layers == config.model.num_layers
  np.testing.assert_array_equal(model.intervals, [[np.float32(0.002), np.float32(80.0)]])
  _, states, _, history = train.train(config, str(tmp_path), digits)
  assert len(history) == config.train.num_steps and int(states[0].step) == 10


def test_resume_continues_exactly(tmp_path, digits):
  """A run killed after its second-to-last save resumes to the same parameters."""
  config = tiny_config()  # 20 iterations, a checkpoint every 5, the last 2 kept
  workdir = tmp_path / "run"
  _, straight, _, _ = train.train(config, str(workdir), digits)
  # Simulate a kill between the saves at 15 and 20: the newest checkpoint never made it.
  shutil.rmtree(workdir / "checkpoints" / "20")
  _, resumed, _, history = train.train(config, str(workdir), digits)
  chex.assert_trees_all_equal(resumed, straight)
  assert [r["step"] for r in history] == list(range(20))  # no duplicated metric rows


def test_tensorboard_has_one_point_per_step_after_any_number_of_resumes(tmp_path, digits):
  config = tiny_config()  # 20 iterations, a checkpoint every 5, the last 2 kept
  workdir = tmp_path / "run"
  train.train(config, str(workdir), digits)
  for _ in range(3):  # killed after the save at 15, three times: 15 -> 20 logged again
    shutil.rmtree(workdir / "checkpoints" / "20")
    train.train(config, str(workdir), digits)
  scalars = read_scalars(str(workdir / "tensorboard"))
  with open(workdir / "train_metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  for tag, points in scalars.items():
    steps = [step for step, _ in points]
    assert len(steps) == len(set(steps)), tag
  for b in range(2):
    assert scalars[f"block_{b}/loss"] == [(r["step"], pytest.approx(r["loss"]))
                                          for r in rows if r["block"] == b]
    assert [v for _, v in scalars[f"block_{b}/learning_rate"]] == pytest.approx(
        [r["learning_rate"] for r in rows if r["block"] == b])
  assert [s for s, _ in scalars["throughput/iterations_per_second"]] == [4, 9, 14, 19]


def test_nan_loss_stops_with_step_and_block_and_keeps_last_checkpoint(tmp_path, digits):
  config = tiny_config()
  workdir = str(tmp_path)
  train.train(tiny_config(**{"train__num_steps": 5}), workdir, digits)  # 10 iterations
  poisoned = data.ImageData(digits.images * np.float32(1e38), digits.labels, 10)
  with pytest.raises(NonFiniteLossError, match=r"block \d at iteration 1\d: loss"):
    train.train(config, workdir, poisoned)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  assert steps[-1] == 10  # nothing saved past the last good one
  _, states, _, _ = train.train(tiny_config(**{"train__num_steps": 5}), workdir, digits)
  chex.assert_tree_all_finite(states)


def test_schedules_that_run_but_not_as_meant_warn_in_one_line(tmp_path, digits):
  with pytest.warns(ConfigWarning, match=r"config.train.warmup_steps=2 is not below "
                                         r"config.train.num_steps=2 \(the updates each"):
    train.train(tiny_config(train__warmup_steps=2, train__num_steps=2),
                str(tmp_path / "warm"), digits)
  workdir = str(tmp_path / "resumed")
  train.train(tiny_config(train__num_steps=2, train__warmup_steps=1), workdir, digits)
  with pytest.warns(ConfigWarning, match=r"config.train.num_steps=3 differs from the "
                                         r"checkpoint's 2: the resumed run's learning-rate"):
    _, _, _, history = train.train(tiny_config(train__num_steps=3, train__warmup_steps=1),
                                   workdir, digits)
  assert len(history) == 6


def test_an_interrupted_evaluation_is_redone_by_the_next_call(tmp_path, monkeypatch):
  config = tiny_config()
  config.eval.enabled = True
  config.eval.cache_dir = str(tmp_path / "cache")
  evaluate = ImageGeneration.evaluate

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(ImageGeneration, "evaluate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.json")  # no half-written file
  monkeypatch.setattr(ImageGeneration, "evaluate", evaluate)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))  # trains nothing more
  assert results["frechet_distance"] > 0 and os.path.exists(tmp_path / "run" / "metrics.json")


def test_unwritable_workdir_is_reported(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(WorkdirError, match="not writable"):
    train.train(tiny_config(), str(blocker / "run"))


def test_checkpoint_of_another_config_is_refused(tmp_path, digits):
  train.train(tiny_config(), str(tmp_path), digits)
  other = tiny_config(**{"diffusion__num_blocks": 4})
  with pytest.raises(ConfigError, match="diffusion.num_blocks"):
    train.train(other, str(tmp_path), digits)


def test_load_run_reads_config_from_checkpoint(tmp_path, digits):
  config = tiny_config(**{"model__hidden_size": 48})
  _, states, _, _ = train.train(config, str(tmp_path), digits)
  run = dbjax.load_run(str(tmp_path))
  assert run.config.model.hidden_size == 48 and run.task.num_blocks == 2
  assert run.iteration == 20
  chex.assert_trees_all_equal(run.states, states)
  chex.assert_trees_all_equal(run.params, [s.params for s in states])
  images = run.sample(jax.random.key(0), jax.numpy.arange(3), num_steps=4)
  chex.assert_shape(images, (3, 8, 8, 1))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["hidden_size"] == 48


def test_train_and_evaluate_writes_its_outputs(tmp_path):
  config = tiny_config()
  config.eval.enabled = True
  config.eval.cache_dir = str(tmp_path / "cache")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  for name in ("samples.png", "loss_curves.png", "metrics.json", "train_metrics.jsonl"):
    assert os.path.getsize(tmp_path / "run" / name) > 0
  with open(tmp_path / "run" / "metrics.json") as f:
    assert json.load(f)["frechet_distance"] == results["frechet_distance"]
  assert np.isfinite(results["frechet_distance"]) and results["frechet_distance"] > 0
  # The pictures are in TensorBoard too.
  assert {"images/samples", "images/loss_curves"} <= set(
      read_tags(str(tmp_path / "run" / "tensorboard"))["images"])
