"""The noise distribution, its partition into blocks, and the one sigma -> block map.

EDM samples log sigma ~ Normal(p_mean, p_std) restricted to [sigma_min, sigma_max].
DiffusionBlocks cuts that range into B intervals, one per block (paper, Sec. 3.2):

  q_min = Phi((ln sigma_min - p_mean) / p_std),   q_max likewise,
  q_b   = q_min + (b / B) (q_max - q_min),
  sigma_b = exp(p_mean + p_std Phi^-1(q_b)),      b = 0..B,

so every block gets the same probability mass. Boundaries ascend in sigma, but blocks
are numbered in the order they run at inference: block 0 owns the HIGHEST interval
(it sees pure noise) and block B-1 the lowest (it finishes the clean sample).
`block_interval` and `block_of_sigma` are the only places that encode this order;
training, sampling and evaluation all go through them.

Boundaries are computed once on the host in float64: in float32 the normal CDF is so
flat at the top that Phi^-1(Phi(z(80))) comes back as 79.73 (docs/method.md, pitfalls).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

PARTITIONS = ("equiprobable", "uniform_log")


class NoiseDistribution(NamedTuple):
  """EDM's training distribution of noise levels (Karras et al. 2022, Table 1)."""
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_min: float = 0.002
  sigma_max: float = 80.0


def pure_noise(key, shape, dist: NoiseDistribution) -> jax.Array:
  """The start of every sampling chain, z ~ N(0, sigma_max^2 I) (paper, Sec. 3; the
  released code uses variance 1 + sigma_max^2, a difference of 0.008%)."""
  return dist.sigma_max * jax.random.normal(key, shape)


def _cdf_levels(dist: NoiseDistribution, num_intervals: int) -> np.ndarray:
  """num_intervals + 1 sigmas, ascending, equally spaced in the log-normal CDF.

  Shared by the partition and the sampling grid, so with a grid of k * B steps the
  grid points that fall on block boundaries are bit-identical to them.
  """
  # NumPy and SciPy in float64 on the host: constants even inside a jit trace (a sampler
  # jitted whole), and no XLA computation to compile for each number of intervals.
  # Imported here, so that `import dbjax` does not pay for SciPy.
  from scipy import special  # pylint: disable=g-import-not-at-top
  z = (np.log([dist.sigma_min, dist.sigma_max]) - dist.p_mean) / dist.p_std
  q_min, q_max = special.ndtr(z)  # Phi
  q = q_min + np.arange(num_intervals + 1) / num_intervals * (q_max - q_min)
  sigmas = np.exp(dist.p_mean + dist.p_std * special.ndtri(q))  # Phi^-1
  # Pin the end points: even float64 loses a few ulps through Phi^-1(Phi(.)).
  sigmas[0], sigmas[-1] = dist.sigma_min, dist.sigma_max
  return sigmas


def block_boundaries(num_blocks: int, p_mean: float = -1.2, p_std: float = 1.2,
                     sigma_min: float = 0.002, sigma_max: float = 80.0) -> np.ndarray:
  """The B + 1 ascending boundaries of the equi-probability partition (float64)."""
  _check_num_blocks(num_blocks)
  return _cdf_levels(NoiseDistribution(p_mean, p_std, sigma_min, sigma_max), num_blocks)


def uniform_log_boundaries(num_blocks: int, sigma_min: float = 0.002,
                           sigma_max: float = 80.0) -> np.ndarray:
  """B + 1 ascending boundaries equally spaced in log sigma (the paper's ablation)."""
  _check_num_blocks(num_blocks)
  sigmas = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), num_blocks + 1))
  sigmas[0], sigmas[-1] = sigma_min, sigma_max
  return sigmas


def partition(kind: str, num_blocks: int, dist: NoiseDistribution) -> np.ndarray:
  """Boundaries of the partition named `kind` (one of PARTITIONS)."""
  if kind == "equiprobable":
    return block_boundaries(num_blocks, *dist)
  if kind == "uniform_log":
    return uniform_log_boundaries(num_blocks, dist.sigma_min, dist.sigma_max)
  raise ValueError(f"partition={kind!r} is not one of {PARTITIONS}")


def _check_num_blocks(num_blocks):
  if not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
    raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")


def block_interval(boundaries: np.ndarray, block_index: int) -> tuple[float, float]:
  """(lo, hi) of the noise interval that block `block_index` owns.

  Block 0 owns the top interval [sigma_{B-1}, sigma_B]; block B-1 the bottom one.
  """
  num_blocks = len(boundaries) - 1
  if not 0 <= block_index < num_blocks:
    raise ValueError(f"block_index={block_index} is outside 0..{num_blocks - 1}")
  interval = num_blocks - 1 - block_index
  return float(boundaries[interval]), float(boundaries[interval + 1])


def block_of_sigma(sigma, boundaries: np.ndarray):
  """The block that owns noise level `sigma`: the inverse of `block_interval`.

  Intervals are half-open (lo, hi]: a sigma on a boundary belongs to the block whose
  upper end it is, so a sampling grid that starts at sigma_max runs block 0 first and,
  with as many steps as blocks, runs every block exactly once. sigma_min belongs to
  the last block. Works on numpy (host) and jax (traced) arrays alike.
  """
  xp = jnp if isinstance(sigma, jax.Array) else np
  num_blocks = len(boundaries) - 1
  boundaries = xp.asarray(boundaries, dtype=xp.asarray(sigma).dtype)
  interval = xp.clip(xp.searchsorted(boundaries, sigma, side="left") - 1, 0, num_blocks - 1)
  return num_blocks - 1 - interval


def widen_interval(lo: float, hi: float, gamma: float, sigma_min: float = 0.002,
                   sigma_max: float = 80.0) -> tuple[float, float]:
  """Overlap: widen [lo, hi] to [lo / a, hi * a] with a = (hi / lo)^gamma, clipped.

  Each block then also trains a little on its neighbours' noise levels, which smooths
  the hand-over between blocks at inference (paper, Sec. 3.3; gamma = 0.05 default).
  """
  if gamma < 0:
    raise ValueError(f"overlap gamma must be >= 0, got {gamma}")
  a = (hi / lo) ** gamma
  return max(lo / a, sigma_min), min(hi * a, sigma_max)


def training_intervals(boundaries: np.ndarray, gamma: float, sigma_min: float,
                       sigma_max: float) -> np.ndarray:
  """(B, 2) array of each block's widened training interval, row b for block b."""
  num_blocks = len(boundaries) - 1
  return np.array([widen_interval(*block_interval(boundaries, b), gamma, sigma_min, sigma_max)
                   for b in range(num_blocks)], dtype=np.float32)


def sample_sigma(key: jax.Array, shape, lo, hi, p_mean: float = -1.2,
                 p_std: float = 1.2) -> jax.Array:
  """Log-normal noise levels truncated to [lo, hi], by inverse-CDF sampling.

  u ~ U(Phi(z_lo), Phi(z_hi)), sigma = exp(p_mean + p_std Phi^-1(u)). lo and hi may be
  traced, so one compiled step serves every block. The result is clipped to [lo, hi]
  because float32 Phi^-1 is coarse in the far upper tail (see the module docstring).
  """
  z_lo = (jnp.log(lo) - p_mean) / p_std
  z_hi = (jnp.log(hi) - p_mean) / p_std
  u = jax.random.uniform(key, shape, minval=norm.cdf(z_lo), maxval=norm.cdf(z_hi))
  return jnp.clip(jnp.exp(p_mean + p_std * norm.ppf(u)), lo, hi)


def sampling_sigmas(num_steps: int, dist: NoiseDistribution, kind: str = "equiprobable",
                    boundaries: np.ndarray | None = None) -> np.ndarray:
  """num_steps + 1 descending sigmas from sigma_max to sigma_min: the partition named
  `kind` with num_steps intervals in place of B. So the grid follows the blocks' own
  partition: with num_steps = k B each block gets k steps, under either partition
  (equally spaced in the log-normal CDF for "equiprobable", in log sigma for
  "uniform_log"). Grid points within 1e-9 (relative) of a block boundary in
  `boundaries` are set to it exactly, so `block_of_sigma` routes them to the block whose
  upper end they are (two float grids can differ there by an ulp)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = partition(kind, num_steps, dist)
  if boundaries is not None:
    boundaries = np.asarray(boundaries, np.float64)
    nearest = np.abs(grid[:, None] - boundaries[None]).argmin(1)
    on_boundary = np.isclose(grid, boundaries[nearest], rtol=1e-9, atol=0)
    grid = np.where(on_boundary, boundaries[nearest], grid)
  return grid[::-1].copy()
