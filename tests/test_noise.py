"""The partition, overlap, truncated sampler and the one sigma -> block map."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dbjax import noise

DIST = noise.NoiseDistribution()


def reference_boundaries(num_blocks, p_mean=-1.2, p_std=1.2, lo=0.002, hi=80.0):
  """The paper's formula with scipy in float64, written out independently."""
  z = (np.log([lo, hi]) - p_mean) / p_std
  q_min, q_max = scipy.stats.norm.cdf(z)
  q = q_min + np.arange(num_blocks + 1) / num_blocks * (q_max - q_min)
  return np.exp(p_mean + p_std * scipy.stats.norm.ppf(q))


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 6])
def test_equiprobable_boundaries_match_closed_form(num_blocks):
  bounds = noise.block_boundaries(num_blocks)
  assert bounds.shape == (num_blocks + 1,)
  np.testing.assert_allclose(bounds, reference_boundaries(num_blocks), rtol=1e-9)
  assert np.all(np.diff(bounds) > 0)


def test_end_points_are_exact():
  # In float32 the upper end would come back as ~79.73 (docs/method.md, "Noise levels", precision).
  bounds = noise.block_boundaries(3)
  assert bounds[0] == 0.002 and bounds[-1] == 80.0


def test_every_block_gets_the_same_probability_mass():
  bounds = noise.block_boundaries(4)
  mass = np.diff(scipy.stats.norm.cdf((np.log(bounds) + 1.2) / 1.2))
  np.testing.assert_allclose(mass, mass[0], rtol=1e-9)


def test_two_blocks_split_at_the_truncated_median():
  lo, hi = scipy.stats.norm.cdf((np.log([0.002, 80.0]) + 1.2) / 1.2)
  median = np.exp(-1.2 + 1.2 * scipy.stats.norm.ppf((lo + hi) / 2))
  assert noise.block_boundaries(2)[1] == pytest.approx(median, rel=1e-12)


def test_uniform_log_boundaries_are_log_spaced():
  bounds = noise.uniform_log_boundaries(4)
  np.testing.assert_allclose(np.diff(np.log(bounds)), np.log(80 / 0.002) / 4, rtol=1e-12)
  assert bounds[0] == 0.002 and bounds[-1] == 80.0


def test_block_zero_owns_the_highest_noise():
  bounds = noise.block_boundaries(3)
  assert noise.block_interval(bounds, 0) == (bounds[2], 80.0)
  assert noise.block_interval(bounds, 2) == (0.002, bounds[1])
  assert noise.block_of_sigma(np.float64(80.0), bounds) == 0
  assert noise.block_of_sigma(np.float64(0.002), bounds) == 2


@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_training_intervals_and_block_map_agree(num_blocks):
  """Sigmas drawn for block b in training map back to b at sampling time."""
  bounds = noise.block_boundaries(num_blocks)
  for b in range(num_blocks):
    lo, hi = noise.block_interval(bounds, b)
    sigma = noise.sample_sigma(jax.random.key(b), (2000,), lo, hi)
    # Leave out draws rounded onto the lower boundary (float32): they belong below.
    sigma = np.asarray(sigma, np.float64)
    sigma = sigma[sigma > lo * (1 + 1e-6)]
    assert np.all(noise.block_of_sigma(sigma, bounds) == b)
    # The traced (jax) version of the map agrees with the host one.
    chex.assert_trees_all_equal(np.asarray(noise.block_of_sigma(jnp.asarray(sigma), bounds)),
                                noise.block_of_sigma(sigma, bounds))


def test_boundary_sigma_belongs_to_the_block_it_tops():
  bounds = noise.block_boundaries(3)
  assert noise.block_of_sigma(bounds[2], bounds) == 1  # upper end of block 1
  assert noise.block_of_sigma(bounds[1], bounds) == 2


@pytest.mark.parametrize("num_blocks,steps_per_block", [(2, 1), (3, 1), (3, 4), (4, 5)])
def test_sampling_grid_spreads_steps_evenly_over_blocks(num_blocks, steps_per_block):
  sigmas = noise.sampling_sigmas(num_blocks * steps_per_block, DIST)
  assert sigmas[0] == 80.0 and sigmas[-1] == 0.002 and np.all(np.diff(sigmas) < 0)
  steps = noise.block_of_sigma(sigmas[:-1], noise.block_boundaries(num_blocks))
  # Block 0 first, each block a contiguous run of exactly steps_per_block steps.
  np.testing.assert_array_equal(steps, np.repeat(np.arange(num_blocks), steps_per_block))


def test_widen_interval_closed_form():
  assert noise.widen_interval(1.0, 4.0, 0.5) == pytest.approx((0.5, 8.0))
  assert noise.widen_interval(1.0, 4.0, 0.0) == (1.0, 4.0)
  assert noise.widen_interval(0.003, 70.0, 0.5) == (0.002, 80.0)  # clipped
  with pytest.raises(ValueError, match="gamma"):
    noise.widen_interval(1.0, 2.0, -0.1)


def test_training_intervals_overlap_their_neighbours():
  bounds = noise.block_boundaries(3)
  intervals = noise.training_intervals(bounds, 0.05, 0.002, 80.0)
  for b in range(2):  # block b's low end reaches below block b+1's high end
    assert intervals[b, 0] < intervals[b + 1, 1]
  assert intervals[0, 1] == np.float32(80.0) and intervals[-1, 0] == np.float32(0.002)


def test_truncated_sampler_stays_in_range_and_follows_the_log_normal():
  lo, hi = 0.1, 2.0
  sigma = np.asarray(noise.sample_sigma(jax.random.key(0), (20000,), lo, hi), np.float64)
  assert sigma.min() >= np.float32(lo) and sigma.max() <= np.float32(hi)
  # Under the truncated log-normal, Phi(z(sigma)) is uniform on [Phi(z_lo), Phi(z_hi)].
  cdf = lambda s: scipy.stats.norm.cdf((np.log(s) + 1.2) / 1.2)
  u = (cdf(sigma) - cdf(lo)) / (cdf(hi) - cdf(lo))
  assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3


def test_top_block_sampler_reaches_sigma_max():
  sigma = noise.sample_sigma(jax.random.key(1), (50000,), 10.0, 80.0)
  assert float(sigma.max()) <= 80.0 and float(sigma.max()) > 40.0


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_blocks_is_refused(bad):
  with pytest.raises(ValueError, match="num_blocks"):
    noise.block_boundaries(bad)


@pytest.mark.parametrize("kind", noise.PARTITIONS)
@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_sampling_grid_follows_the_partition(kind, num_blocks):
  """With N = 10 B steps each block runs 10 under either partition (a grid equally spaced
  in the CDF under uniform_log once gave B = 3 blocks 2, 25 and 3 steps)."""
  bounds = noise.partition(kind, num_blocks, DIST)
  sigmas = noise.sampling_sigmas(10 * num_blocks, DIST, kind, bounds)
  assert sigmas[0] == DIST.sigma_max and sigmas[-1] == DIST.sigma_min
  assert np.all(np.diff(sigmas) < 0)
  owners = noise.block_of_sigma(sigmas[:-1], bounds)
  np.testing.assert_array_equal(owners, np.repeat(np.arange(num_blocks), 10))
  if kind == "uniform_log":  # equally spaced in log sigma
    np.testing.assert_allclose(np.diff(np.log(sigmas)), np.diff(np.log(sigmas))[0], rtol=1e-9)
  else:  # unchanged: the partition's own levels
    np.testing.assert_array_equal(sigmas, noise.sampling_sigmas(10 * num_blocks, DIST))
