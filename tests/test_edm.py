"""EDM preconditioning and loss weighting against their closed forms."""
import jax.numpy as jnp
import numpy as np
import pytest

from dbjax import edm

SIGMAS = np.array([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], np.float32)


def test_coefficients_at_sigma_equal_sigma_data():
  c = edm.preconditioning(0.5, sigma_data=0.5)
  assert float(c.c_skip) == pytest.approx(0.5)
  assert float(c.c_out) == pytest.approx(0.5 / np.sqrt(2))
  assert float(c.c_in) == pytest.approx(1 / (0.5 * np.sqrt(2)))
  assert float(c.c_noise) == pytest.approx(np.log(0.5) / 4)


def test_training_target_has_unit_variance():
  """Var[(y - c_skip (y + sigma n)) / c_out] = 1 for y of variance sigma_data^2."""
  sd = 0.5
  c = edm.preconditioning(SIGMAS, sd)
  var = ((1 - c.c_skip)**2 * sd**2 + c.c_skip**2 * SIGMAS**2) / c.c_out**2
  np.testing.assert_allclose(var, 1.0, rtol=1e-5)
  # and the network input c_in (y + sigma n) too
  np.testing.assert_allclose(c.c_in**2 * (sd**2 + SIGMAS**2), 1.0, rtol=1e-5)


def test_loss_weight_is_inverse_c_out_squared():
  c = edm.preconditioning(SIGMAS)
  np.testing.assert_allclose(edm.loss_weight(SIGMAS), 1 / c.c_out**2, rtol=1e-5)


def test_zero_network_denoiser_is_c_skip_times_input():
  z = jnp.ones((3, 2, 2, 1)) * jnp.arange(1, 4.0)[:, None, None, None]
  sigma = jnp.array([0.1, 1.0, 10.0])
  out = edm.denoise(lambda x, c: jnp.zeros_like(x), z, sigma)
  expected = z * (0.25 / (sigma**2 + 0.25))[:, None, None, None]
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_network_sees_scaled_input_and_noise_label():
  seen = {}

  def network(x, c_noise):
    seen["x"], seen["c_noise"] = x, c_noise
    return jnp.zeros_like(x)
  z = jnp.full((2, 1, 1, 1), 3.0)
  sigma = jnp.array([1.0, 2.0])
  edm.denoise(network, z, sigma)
  np.testing.assert_allclose(seen["x"][:, 0, 0, 0], 3.0 / np.sqrt(np.array([1.0, 4.0]) + 0.25),
                             rtol=1e-6)
  np.testing.assert_allclose(seen["c_noise"], np.log([1.0, 2.0]) / 4, rtol=1e-6)


def test_weighted_l2_loss_closed_form():
  clean = jnp.zeros((2, 2, 2, 1))
  denoised = jnp.ones((2, 2, 2, 1)) * jnp.array([1.0, 2.0])[:, None, None, None]
  sigma = jnp.array([0.5, 1.0])
  loss = edm.weighted_l2_loss(denoised, clean, sigma)
  w = (sigma**2 + 0.25) / (sigma * 0.5)**2
  np.testing.assert_allclose(loss, w * jnp.array([1.0, 4.0]), rtol=1e-6)
