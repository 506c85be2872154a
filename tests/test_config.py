"""Config errors name the field, the value and what is allowed."""
import json
import os

import pytest

from dbjax import config as config_lib, tasks
from dbjax.errors import ConfigError
from tests.conftest import tiny_config


def test_defaults_are_valid():
  config_lib.validate(config_lib.default_config())


def test_typo_in_a_locked_config_fails_at_once():
  config = config_lib.default_config()
  with pytest.raises(AttributeError, match="num_step"):
    config.train.num_step = 5


def test_wrong_type_is_refused():
  config = config_lib.default_config()
  with pytest.raises(TypeError):
    config.train.batch_size = "large"


def test_unknown_field_in_a_hand_built_config_is_named():
  config = config_lib.default_config()
  config.unlock()
  config.model.depth = 12
  with pytest.raises(ConfigError, match="config.model.depth is not a known field"):
    config_lib.validate(config)
  del config.model["depth"]
  config.train.num_step = 5  # the nearest known field is suggested
  with pytest.raises(ConfigError, match=r"config.train.num_step is not a known field \(did "
                                        r"you mean 'num_steps'\?\); known fields of config.train"):
    config_lib.validate(config)


@pytest.mark.parametrize("field,value,message", [
    ("diffusion__num_blocks", 5, "diffusion.num_blocks=5 .* must divide model.num_layers=4"),
    ("diffusion__num_blocks", 0, "diffusion.num_blocks=0 .* positive integer"),
    ("method", "backprop", "method='backprop' .* one of"),
    ("sample__solver", "rk4", "sample.solver='rk4'"),
    ("diffusion__partition", "linear", "diffusion.partition='linear'"),
    ("diffusion__overlap_gamma", 1.5, "overlap_gamma=1.5 .* in \\[0, 1\\)"),
    ("diffusion__sigma_min", 100.0, "sigma_min=100.0"),
    ("model__patch_size", 3, "patch_size=3 .* must divide data.image_size=8"),
    ("model__hidden_size", 30, "hidden_size=30"),
    ("train__learning_rate", -1.0, "learning_rate=-1.0"),
    ("model__label_dropout", 1.0, "label_dropout=1.0"),
])
def test_out_of_range_values_name_the_field(field, value, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(tiny_config(**{field: value}))


def test_end_to_end_ignores_num_blocks_divisibility():
  config = tiny_config(method="end_to_end", diffusion__num_blocks=3)
  config_lib.validate(config)
  assert config_lib.num_trained_blocks(config) == 1
  assert config_lib.total_iterations(config) == config.train.num_steps


def test_diffusion_blocks_runs_b_times_the_iterations():
  config = tiny_config()
  assert config_lib.total_iterations(config) == 2 * config.train.num_steps


def test_a_text_vocabulary_has_its_own_field():
  """data.num_classes counts image classes; a language run that sets it is told, in one
  line, that the vocabulary size is data.vocab_size."""
  config = config_lib.default_config("language")
  config.data.num_classes = 0
  with pytest.raises(ConfigError, match=r"config\.data\.num_classes=0 .*config\.data\.vocab_size"):
    config_lib.validate(config)
  config.data.num_classes, config.data.vocab_size = 10, -1
  with pytest.raises(ConfigError, match=r"config\.data\.vocab_size=-1"):
    config_lib.validate(config)


def test_a_config_saved_before_vocab_size_is_upgraded():
  """A language run saved its vocabulary size in data.num_classes before data.vocab_size
  existed; restoring it moves the value over. Other tasks load unchanged."""
  saved = json.loads(config_lib.default_config().to_json())
  saved["task"] = "language"
  saved["data"]["num_classes"] = 84
  del saved["data"]["vocab_size"]
  config = config_lib.validate(config_lib.from_saved(saved))
  assert (config.data.vocab_size, config.data.num_classes) == (84, 10)
  classes = json.loads(config_lib.default_config("classification").to_json())
  classes["data"]["num_classes"], classes["classifier"]["inference_steps"] = 7, [1, 3]
  config = config_lib.from_saved(classes)
  assert config.data.num_classes == 7 and config.classifier.inference_steps == (1, 3)


@pytest.mark.parametrize("task", ["generation", "language"])
def test_a_config_json_saved_before_tasks_owned_their_sections_still_loads(task):
  """Runs saved before each task owned its config section hold every task's sections
  (tests/data/: written by that code). They load as their own task's config, with
  their values, and without the other tasks' sections."""
  path = os.path.join(os.path.dirname(__file__), "data",
                      f"config_json_before_task_sections_{task}.json")
  with open(path) as f:
    saved = json.load(f)
  assert {"classifier", "language", "recurrent", "sample"} <= set(saved)
  config = config_lib.validate(config_lib.from_saved(saved))
  own = {"generation": {"sample"}, "language": {"language"}}[task]
  assert set(config) & {"classifier", "language", "recurrent", "sample"} == own
  if task == "generation":
    assert (config.data.num_classes, config.sample.guidance_scale) == (7, 3.0)
  else:
    assert (config.language.positions, config.data.vocab_size) == ("rotary", 65)


def test_each_task_config_holds_its_own_sections_only():
  sections = {task: set(config_lib.default_config(task)) for task in tasks.REGISTRY}
  assert "language" not in sections["generation"] and "sample" in sections["generation"]
  assert "classifier" in sections["classification"] and "sample" not in sections[
      "classification"]
  assert {"language", "recurrent"} <= sections["recurrent_depth"]
  wrong = config_lib.default_config()
  wrong.task = "language"
  with pytest.raises(ConfigError, match=r"config.task='language' needs a config.language "
                     r"section, which this config lacks: start it from "
                     r"dbjax.config.default_config\('language'\)"):
    config_lib.validate(wrong)
  switched = config_lib.with_task(wrong, "classification")
  assert switched.task == "classification" and "classifier" in switched
  assert "sample" not in switched
