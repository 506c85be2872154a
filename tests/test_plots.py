"""Sample grids: layout, gaps and the [-1, 1] -> [0, 255] mapping."""
import os
import subprocess
import sys

import numpy as np

from dbjax.eval import plots


def test_image_grid_layout_and_values():
  black, white = np.full((2, 2, 1), -1.0), np.full((2, 2, 1), 1.0)
  grid = plots.image_grid(np.stack([black, white, white]), rows=2)  # 2 x 2 cells, one empty
  assert grid.shape == (5, 5, 1) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[:2, :2, 0], 0)      # black cell, top left
  np.testing.assert_array_equal(grid[:2, 3:, 0], 255)    # white cell, top right
  np.testing.assert_array_equal(grid[2, :, 0], 255)      # 1-pixel gap row
  np.testing.assert_array_equal(grid[3:, 3:, 0], 255)    # the empty cell stays blank


def test_grid_png_is_scaled(tmp_path):
  import matplotlib.pyplot as plt
  images = np.zeros((4, 3, 3, 1), np.float32)
  plots.save_image_grid(images, str(tmp_path / "g.png"), rows=2, scale=4)
  assert plt.imread(tmp_path / "g.png").shape[:2] == (7 * 4, 7 * 4)


def test_loss_curves_one_line_per_trained_block(tmp_path):
  rows = [{"step": s, "block": s % 2, "loss": 1.0 / (s + 1)} for s in range(40)]
  plots.save_loss_curves(rows, 3, str(tmp_path / "loss.png"))  # block 2 never trained
  assert (tmp_path / "loss.png").stat().st_size > 0


def test_importing_dbjax_leaves_the_pyplot_backend_alone():
  """A notebook's inline plots keep working after `import dbjax` (the pictures dbjax
  writes are made without pyplot)."""
  code = "import dbjax, matplotlib; print(matplotlib.get_backend())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env=dict(os.environ, MPLBACKEND="svg")).stdout
  assert out.strip() == "svg"
