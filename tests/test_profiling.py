"""Memory of a block's train step against end-to-end, read from XLA's memory analysis."""
import functools

import pytest

from dbjax import tasks
from dbjax.engine import profiling
from tests.conftest import tiny_config


@functools.cache  # each variant compiles once for the whole module
def step_bytes(method, num_blocks, remat=False):
  config = tiny_config(method=method, diffusion__num_blocks=num_blocks)
  config.model.num_layers, config.model.hidden_size, config.model.num_heads = 12, 64, 4
  config.model.remat = remat
  return profiling.train_step_memory(tasks.build(config), 64)["step_bytes"]


@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_a_block_needs_about_one_bth_of_end_to_end_memory(num_blocks):
  ratio = step_bytes("end_to_end", 1) / step_bytes("diffusion_blocks", num_blocks)
  assert ratio >= 0.8 * num_blocks, ratio


def test_remat_lowers_end_to_end_memory():
  assert step_bytes("end_to_end", 1, remat=True) < 0.7 * step_bytes("end_to_end", 1)
