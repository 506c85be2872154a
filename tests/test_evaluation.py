"""Frechet distance against closed forms; the cached feature classifier."""
import numpy as np
import pytest

from dbjax import data
from dbjax.errors import ConfigWarning
from dbjax.eval import features as evaluation


def test_frechet_distance_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(0).standard_normal((500, 8))
  assert evaluation.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shift_is_the_squared_shift():
  x = np.random.default_rng(1).standard_normal((500, 8))
  shift = np.arange(8) * 0.1
  assert evaluation.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)


def test_frechet_distance_of_scaled_gaussians():
  """Same mean, covariances I and s^2 I in D dims: FD = D (1 - s)^2."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((200_000, 3))
  y = 2.0 * rng.standard_normal((200_000, 3))
  assert evaluation.frechet_distance(x, y) == pytest.approx(3 * (1 - 2.0)**2, rel=0.02)


def test_feature_net_learns_digits_and_is_cached(tmp_path):
  train, test = data.load_images("digits", "train"), data.load_images("digits", "test")
  net = evaluation.load_or_train_feature_net("digits", train, 150, str(tmp_path))
  results = evaluation.evaluate_samples(net, test.images, test.labels, test)
  assert results["feature_net_test_accuracy"] > 0.8
  assert results["class_accuracy"] == results["feature_net_test_accuracy"]
  assert results["frechet_distance"] == pytest.approx(0.0, abs=1e-3)  # test set vs itself
  # Second call loads the cached classifier: same features, no retraining.
  cached = evaluation.load_or_train_feature_net("digits", train, 150, str(tmp_path))
  np.testing.assert_array_equal(cached.features(test.images[:10]), net.features(test.images[:10]))
  assert results["frechet_test_images"] == 360
  small = data.ImageData(test.images[:12], test.labels[:12], 10)
  with pytest.warns(ConfigWarning, match="measured against 12 test images; below 256"):
    assert evaluation.evaluate_samples(net, test.images[:60], test.labels[:60],
                                       small)["frechet_test_images"] == 12
