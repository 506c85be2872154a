"""Config errors name the field, the value and what is allowed."""
import pytest

from dbjax import config as config_lib
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
