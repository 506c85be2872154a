"""A checkpoint is checked against the run's own trees before anything is read: a run
of another config is refused in one line naming the differing path and the config
field behind it, and the checkpoints stay where they are."""
import os

import chex
import jax
import numpy as np
import pytest

from dbjax import data, train
from dbjax.data import text
from dbjax.engine.checkpoint import first_difference, tree_signature
from dbjax.errors import ConfigError
from tests.conftest import tiny_config
from tests.test_language import TEXT, lm_config


def _language_data(config):
  vocabulary = text.Vocabulary.of_text(TEXT)
  ids = vocabulary.encode(TEXT * 4)
  return text.TextData(text.sequences(ids, config.language.seq_len), vocabulary)


def _digits(config):
  return data.load_images("digits", "train")


def _short(config):
  config.train.num_steps, config.train.checkpoint_every = 2, 2
  return config


RUNS = {  # field changed: (the original config, the changed value, its data)
    "language.positions": (lambda: lm_config(positions="learned"), "rotary", _language_data),
    "language.token_embedding": (lambda: lm_config(), "joint", _language_data),
    "classifier.label_embedding": (lambda: tiny_config(task="classification"), "joint",
                                   _digits),
    "diffusion.num_blocks": (tiny_config, 4, _digits),
    "parallel.mode": (tiny_config, "blocks", _digits),
}


def _listing(workdir):
  return sorted(os.listdir(workdir)), sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.parametrize("field", sorted(RUNS))
def test_another_config_is_one_line_and_moves_nothing(field, tmp_path):
  make, value, load = RUNS[field]
  original = _short(make())
  train_data = load(original)
  workdir = str(tmp_path)
  first = train.train(original, workdir, train_data)
  before = _listing(workdir)
  changed = _short(make())
  section, name = field.split(".")
  changed[section][name] = value
  with pytest.raises(ConfigError) as error:
    train.train(changed, workdir, train_data)
  message = str(error.value)
  assert "\n" not in message and f"config.{field}=" in message
  assert _listing(workdir) == before and not os.path.exists(workdir + "/checkpoints_corrupt")
  # The original command still resumes: nothing left to train, the same states.
  again = train.train(original, workdir, train_data)
  chex.assert_trees_all_equal((again.states, again.shared), (first.states, first.shared))


def test_the_first_differing_path_is_named(tmp_path):
  original = _short(tiny_config())
  train.train(original, str(tmp_path), _digits(original))
  wider = _short(tiny_config(**{"model__hidden_size": 48}))
  with pytest.raises(ConfigError, match=r"block_0/params/\S+ has shape \(\S+\) float32 in the "
                     r"checkpoint, \(\S+\) float32 in this run; caused by "
                     r"config.model.hidden_size=48 \(the checkpoint's: 32\)"):
    train.train(wider, str(tmp_path), _digits(wider))


def test_first_difference_in_words():
  saved = tree_signature({"a": _spec((2, 3))})
  assert first_difference(saved, saved) is None
  assert "a has shape (2, 3) float32 in the checkpoint, (2, 4) float32" in first_difference(
      saved, tree_signature({"a": _spec((2, 4))}))
  assert first_difference(saved, tree_signature({"a": _spec((2, 3)), "b": _spec(())})) == (
      "b is in this run's state but not in the checkpoint")
  assert first_difference(tree_signature({"a": _spec((2, 3)), "c": _spec(())}), saved) == (
      "c is in the checkpoint but not in this run's state")


def _spec(shape):
  return jax.ShapeDtypeStruct(shape, np.float32)


def small_state(value: float):
  return {"w": np.full((64, 8), value, np.float32), "step": np.int32(3)}


def test_an_asynchronous_save_is_complete_and_listed_after_wait(tmp_path):
  """save returns before the files are final; after wait the step is on disk with this
  process's file listing and reads back as it was saved, as a synchronous save's."""
  from dbjax.engine import file_listings  # pylint: disable=g-import-not-at-top
  from dbjax.engine.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  for asynchronous in (True, False):
    directory = str(tmp_path / f"async_{asynchronous}")
    checkpointer = RunCheckpointer(directory, 1, 2, asynchronous=asynchronous)
    checkpointer.save(5, [small_state(1.0)], config, {})
    checkpointer.save(7, [small_state(2.0)], config, {})  # waits for step 5 first
    checkpointer.wait()
    assert checkpointer.latest_step() == 7
    assert os.path.exists(os.path.join(directory, "7", "file_checksums.0.json"))
    file_listings.check(os.path.join(directory, "7"))
    step, states, _, _ = checkpointer.restore([small_state(0.0)], config)
    checkpointer.close()
    assert step == 7
    chex.assert_trees_all_equal(states[0], small_state(2.0))


def test_a_background_save_that_fails_is_raised_at_the_next_wait(tmp_path, monkeypatch):
  """A full disk met while step 7 is written in the background: save has returned, and
  the next wait (the next save, the run's close) raises it as one line naming the step
  and the step kept."""
  import errno  # pylint: disable=g-import-not-at-top
  from dbjax.engine import file_listings  # pylint: disable=g-import-not-at-top
  from dbjax.engine.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  from dbjax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  checkpointer = RunCheckpointer(str(tmp_path), 1, 2, asynchronous=True)
  checkpointer.save(5, [small_state(1.0)], config, {})
  checkpointer.wait()

  def full(step_dir):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(file_listings, "write", full)
  checkpointer.save(7, [small_state(2.0)], config, {})  # returns: the write goes on
  with pytest.raises(CheckpointError, match="saving checkpoint 7 .*checkpoint \\d+ is kept"):
    checkpointer.close()
