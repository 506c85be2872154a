"""Mixed precision (config.model.dtype="bfloat16"; dbjax.nets.dit.compute_dtype): every
task computes in bfloat16 with float32 parameters, gradients and optimizer state, and
its losses and samples stay close to float32's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dbjax
from dbjax import config as config_lib, engine, tasks
from dbjax.errors import ConfigError
from tests.conftest import tiny_config
from tests.test_classify import classify_config
from tests.test_language import lm_config
from tests.test_recurrent import recurrent_config

# Relative difference of a perturbed block's loss in bfloat16 from float32: bfloat16
# keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%), and the few layers of these
# networks add up less than a percent of it (measured: at most 0.07%).
LOSS_TOLERANCE = 0.01


def _recurrent(method):
  return lambda: tasks.load_data(config_lib.validate(recurrent_config(method)))[0]


CONFIGS = {
    "generation": tiny_config,
    "classification": classify_config,
    "autoregressive": lambda: lm_config("autoregressive"),
    "masked": lambda: lm_config("masked"),
    "causal LM": lambda: lm_config("autoregressive", method="end_to_end"),
    "recurrent depth": _recurrent("diffusion_blocks"),
    "Huginn": _recurrent("end_to_end"),
}


def with_dtype(config, dtype):
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  return config


def perturbed(states, scale=0.2):
  """Every parameter moved off its zero or identity init, so each layer does something."""
  rng = np.random.default_rng(0)
  return [s._replace(params=jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), s.params))
      for s in states]


def loss_and_grads(config):
  task = tasks.build(config_lib.validate(config))
  states, shared = engine.init_on_host(task, 0)
  b = task.num_blocks - 1
  args = (perturbed(states)[b].params, shared.params, task.example_batch(8, np.random
                                                                         .default_rng(0)),
          jax.random.key(0), jnp.asarray(task.intervals[b]))
  loss_fn = lambda *a: task.loss(*a)[0]
  jaxpr = str(jax.make_jaxpr(loss_fn)(*args))
  # The gradients' dtypes are known from tracing: only the loss is compiled and run.
  grads = jax.eval_shape(jax.grad(loss_fn), *args)
  return (jax.jit(loss_fn)(*args), grads), jaxpr


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_loss_is_close_to_float32_with_float32_parameters(name):
  (loss32, _), jaxpr32 = loss_and_grads(with_dtype(CONFIGS[name](), "float32"))
  (loss16, grads16), jaxpr16 = loss_and_grads(with_dtype(CONFIGS[name](), "bfloat16"))
  assert "bf16" in jaxpr16 and "bf16" not in jaxpr32  # it does compute in bfloat16
  assert loss16.dtype == jnp.float32 and np.isfinite(loss16)
  assert float(loss16) == pytest.approx(float(loss32), rel=LOSS_TOLERANCE)
  assert float(loss16) != float(loss32)
  assert {leaf.dtype for leaf in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_keeps_parameters_and_optimizer_state_in_float32():
  task = tasks.build(config_lib.validate(with_dtype(tiny_config(), "bfloat16")))
  block, shared = engine.abstract_states(task)
  floats = {leaf.dtype for leaf in jax.tree.leaves((block, shared))
            if jnp.issubdtype(leaf.dtype, jnp.floating)}
  assert floats == {jnp.dtype(jnp.float32)}


def test_bfloat16_samples_are_finite_and_close_to_float32():
  samples = {}
  for dtype in ("float32", "bfloat16"):
    task = tasks.build(config_lib.validate(with_dtype(tiny_config(), dtype)))
    states, shared = engine.init_on_host(task, 0)
    params = [s.params for s in perturbed(states, scale=0.05)]
    samples[dtype] = np.asarray(task.sample(params, shared.params, jax.random.key(0),
                                            np.arange(16) % 10, 4))
  assert np.all(np.isfinite(samples["bfloat16"]))
  # Images in [-1, 1]: bfloat16's rounding moves a pixel by a few thousandths.
  assert np.max(np.abs(samples["bfloat16"] - samples["float32"])) < 0.05
  assert not np.array_equal(samples["bfloat16"], samples["float32"])


class Residual(nnx.Module):
  """A user's layer (x, cond) -> x, in flax's default dtype."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(32, 32, rngs=rngs)

  def __call__(self, x, cond):
    return x + 0.1 * self.linear(x) + cond[:, None]


def dot_operand_dtypes(jaxpr, rhs_shape) -> set:
  """The dtypes of every matrix product in a jaxpr (sub-jaxprs included) whose
  right-hand side has rhs_shape: which precision a given weight is multiplied in."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and eqn.invars[1].aval.shape == rhs_shape:
      found.add((eqn.invars[0].aval.dtype.name, eqn.invars[1].aval.dtype.name))
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(item, "eqns") or hasattr(item, "jaxpr"):
          found |= dot_operand_dtypes(getattr(item, "jaxpr", item), rhs_shape)
  return found


def test_wrap_computes_a_plain_users_layer_in_bfloat16():
  """The README's case: the user's nnx.Linear, with no dtype of its own, multiplies its
  (32, 32) kernel in bfloat16 when wrap is asked for bfloat16 (and in float32 when not),
  the loss differs a little, and what is kept stays float32."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    db = dbjax.wrap(Residual, num_layers=4, num_blocks=2, hidden_size=32, target="image",
                    dtype=dtype)
    assert f"computing in {dtype}" in repr(db)
    state = db.init(jax.random.key(0))[1]
    state = state._replace(params=perturbed([state])[0].params)
    batch = (jnp.linspace(-1, 1, 4 * 64).reshape(4, 8, 8, 1), jnp.arange(4))
    jaxpr = jax.make_jaxpr(lambda p: db.loss(p, batch, jax.random.key(1), 1)[0])(state.params)
    assert dot_operand_dtypes(jaxpr.jaxpr, (32, 32)) == {(dtype, dtype)}
    state, metrics = jax.jit(db.train_step, static_argnums=3)(state, batch,
                                                               jax.random.key(1), 1)
    losses[dtype] = float(metrics["loss"])
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=LOSS_TOLERANCE)
  assert losses["bfloat16"] != losses["float32"]
  with pytest.raises(ConfigError, match="dtype"):
    dbjax.wrap(Residual, num_layers=4, num_blocks=2, hidden_size=32, target="image",
               dtype="half")


def test_the_optimizer_state_stays_float32_through_bfloat16_steps():
  """After real bfloat16 train steps, AdamW's moments (and every other float of the
  block's state) are float32, and they moved."""
  task = tasks.build(config_lib.validate(with_dtype(tiny_config(), "bfloat16")))
  states, shared = engine.init_on_host(task, 0)
  step = engine.jit_train_step(task)
  state, shared_state = jax.device_put(states[0]), jax.device_put(shared)
  for i in range(2):
    state, shared_state, _ = step(state, shared_state, task.example_batch(8),
                                  jax.random.key(i), jnp.asarray(task.intervals[0]))
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 1]
  assert moments and {leaf.dtype for leaf in moments} == {jnp.dtype(jnp.float32)}
  assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in moments)
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


def test_an_unknown_dtype_is_named():
  with pytest.raises(ConfigError, match="model.dtype.*'float32' or 'bfloat16'"):
    config_lib.validate(with_dtype(tiny_config(), "float16"))
