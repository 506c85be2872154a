"""dbjax.nets.attention: every implementation equals plain masked attention, values and
gradients, and a block's train step keeps no (..., T, T) array for its backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dbjax import config as config_lib, tasks
from dbjax.engine import profiling
from dbjax.nets import attention, fused
from dbjax.tasks.language import autoregressive
from tests.conftest import tiny_config
from tests.test_language import lm_config
from tests.test_recurrent import recurrent_config

T = 6  # query rows; the masks over [clean; noisy] take 2T rows or columns


def plain_attention(q, k, v, allowed):
  """softmax(q k^T / sqrt(d)) v with disallowed pairs at -inf, written out in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum("nthd,nshd->nhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(allowed, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("nhts,nshd->nthd", weights, v)


# (mask, query rows, key columns, the allowed pairs written by hand)
MASKS = {
    "none": (None, T, T, np.ones((T, T), bool)),
    "causal": (attention.CAUSAL, T, T, np.tri(T, dtype=bool)),
    "noisy_stream": (attention.NOISY_STREAM, T, 2 * T,
                     np.hstack([np.tri(T, k=-1, dtype=bool), np.eye(T, dtype=bool)])),
    # The mask the autoregressive task documents, itself tested against a hand-written
    # case (tests/test_language.py); a function, so that importing this module starts
    # no backend (tests/test_parallel.py sets its devices first).
    "block_diffusion": (attention.BLOCK_DIFFUSION, 2 * T, 2 * T,
                        lambda: autoregressive.autoregressive_mask(T)),
}
IMPLEMENTATIONS = ["recompute", "xla", "auto", "cudnn"]


def inputs(num_queries, num_keys, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, num_queries, 3, 8))
  k, v = (rng.standard_normal((2, num_keys, 3, 8)) for _ in range(2))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _record_cudnn(monkeypatch) -> list:
  """jax.nn.dot_product_attention replaced by a recorder that runs XLA in cuDNN's place;
  returns the list it fills with (a mask given, is_causal) per call."""
  seen, real = [], jax.nn.dot_product_attention

  def recorder(q, k, v, mask=None, is_causal=False, implementation=None):
    assert implementation == "cudnn"
    seen.append((mask is not None, is_causal))
    return real(q, k, v, mask=mask, is_causal=is_causal)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
  return seen


@pytest.mark.parametrize("mask_name", [name for name in MASKS if name != "none"])
def test_each_structured_mask_allows_the_pairs_written_by_hand(mask_name):
  mask, rows, cols, _ = MASKS[mask_name]
  by_hand = {
      "causal": np.tri(T, dtype=bool),
      "noisy_stream": np.hstack([np.tri(T, k=-1, dtype=bool), np.eye(T, dtype=bool)]),
      # clean rows causal over the clean columns; noisy row i: clean j < i and itself
      "block_diffusion": np.block([[np.tri(T, dtype=bool), np.zeros((T, T), bool)],
                                   [np.tri(T, k=-1, dtype=bool), np.eye(T, dtype=bool)]]),
  }[mask_name]
  np.testing.assert_array_equal(attention.dense_mask(mask, rows, cols), by_hand)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask_name", MASKS)
def test_values_and_gradients_equal_plain_attention(implementation, mask_name):
  mask, rows, cols, allowed = MASKS[mask_name]
  allowed = allowed() if callable(allowed) else allowed
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    pytest.skip("cuDNN needs a GPU")
  dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
  q, k, v = inputs(rows, cols, dtype)
  out = attention.attend(q, k, v, mask, implementation)
  assert out.shape == q.shape and out.dtype == q.dtype
  tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(out, np.float64), plain_attention(q, k, v, allowed),
                             atol=tolerance)
  # Gradients of a loss that weights every output element differently.
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(weights * fn(q, k, v).astype(jnp.float32))
  ours = jax.grad(loss(lambda q, k, v: attention.attend(q, k, v, mask, implementation)),
                  (0, 1, 2))(q, k, v)
  dense_mask = jnp.asarray(allowed)[None, None]
  reference = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      mask=dense_mask)), (0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", ours, reference):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tolerance * 5 if dtype == jnp.bfloat16 else 1e-5,
                               err_msg=f"d{name}")


@pytest.mark.parametrize("mask_name", MASKS)
def test_cudnn_is_given_every_mask(monkeypatch, mask_name):
  """"cudnn" on a CPU, through a recorder that runs XLA in cuDNN's place: every mask
  reaches it (NoisyStream's and the noisy half of BlockDiffusion's as a dense mask;
  only is_causal was passed before, and their noisy rows saw future tokens), and the
  output is plain attention's."""
  mask, rows, cols, allowed = MASKS[mask_name]
  allowed = allowed() if callable(allowed) else allowed
  seen = _record_cudnn(monkeypatch)
  q, k, v = inputs(rows, cols)
  out = attention.attend(q, k, v, mask, "cudnn")
  np.testing.assert_allclose(np.asarray(out, np.float64), plain_attention(q, k, v, allowed),
                             atol=1e-5)
  expected = {"none": [(False, False)], "causal": [(False, True)],
              "noisy_stream": [(True, False)],
              "block_diffusion": [(False, True), (True, False)]}[mask_name]
  assert seen == expected


def test_recompute_keeps_inputs_output_and_log_sum_exp_only():
  q, k, v = inputs(T, T)
  shapes = [shape for shape, _, _ in profiling.residuals_of(lambda q, k, v: jnp.sum(
      attention.attend(q, k, v, attention.CAUSAL, "recompute")), q, k, v)]
  assert (T, T) not in {s[-2:] for s in shapes}
  assert shapes == [q.shape, (2, T, 3)], shapes   # the output, the log-sum-exp per row


def test_bfloat16_attention_computes_its_softmax_in_float32():
  """The scores are float32 although q and k are bfloat16: a softmax over bfloat16 scores
  rounds them to 3 digits, which the float32 scores of the same inputs do not."""
  q, k, v = inputs(T, T, jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.attend(q, k, v, None, "recompute"))(
      q, k, v))
  assert "exp" in jaxpr and "f32[2,3,6,6]" in jaxpr and "bf16[2,3,6,6]" in jaxpr
  out = attention.attend(q, k, v, None, "recompute")
  assert out.dtype == jnp.bfloat16


def test_an_unknown_implementation_is_refused_in_one_line():
  q, k, v = inputs(T, T)
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attention.attend(q, k, v, None, "flash")


# ------------------------------------------------------- what a train step keeps


# Sequence lengths T (and 2T) that no width of these networks equals, so only an
# attention matrix can end in (T, T).
def image_config():
  config = tiny_config(method="diffusion_blocks", diffusion__num_blocks=2)
  config.model.patch_size, config.model.hidden_size = 1, 24  # 64 tokens
  return config, 64


def classifier_config():
  config, _ = image_config()
  # 66 tokens: a [CLS] token and the noisy label token before 64 patches
  return config_lib.with_task(config, "classification"), 66


def language_config(kind, **fields):
  return lm_config(kind=kind, positions="rotary", seq_len=12, **fields), 12


def recurrent_task_config():
  config = recurrent_config()
  config.language.seq_len = 12
  return config, 12


STEP_CONFIGS = {
    "images": image_config,
    "classification": classifier_config,
    "autoregressive": lambda: language_config("autoregressive"),
    "autoregressive_remat_clean": lambda: language_config("autoregressive",
                                                          remat_clean_stream=True),
    "masked": lambda: language_config("masked"),
    "recurrent": recurrent_task_config,
}


def _record_cudnn_calls(monkeypatch, probe_passes: bool) -> list:
  """A faked GPU backend on which "auto" sees cuDNN's probe pass or fail, and a recorder
  of what cuDNN is given (it runs XLA in cuDNN's place): [(mask given, is_causal)]."""
  seen = _record_cudnn(monkeypatch)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "cudnn_runs", lambda *signature: probe_passes)
  return seen


# What "auto" gives cuDNN in one bfloat16 block step on a GPU, per task: each attention
# call as (a dense mask given, is_causal). The autoregressive block's noisy rows
# (NoisyStream) always take "recompute"; its clean rows are causal.
CUDNN_CALLS = {
    "images": {(False, False)}, "classification": {(False, False)},
    "autoregressive": {(False, True)}, "autoregressive_remat_clean": {(False, True)},
    "masked": {(False, False)}, "recurrent": {(False, True)},
}


@pytest.mark.parametrize("name", STEP_CONFIGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("probe_passes", [True, False])
def test_auto_picks_cudnn_where_it_applies_and_its_probe_passes(monkeypatch, name, dtype,
                                                                probe_passes):
  config, _ = STEP_CONFIGS[name]()
  config.model.attention, config.model.dtype = "auto", dtype
  config.model.hidden_size, config.model.num_heads = 32, 2  # head_dim 16, cuDNN's kind
  if config.task in ("language", "recurrent_depth"):
    config, _ = tasks.load_data(config_lib.validate(config))
  task = tasks.build(config_lib.validate(config))
  seen = _record_cudnn_calls(monkeypatch, probe_passes)
  profiling.saved_residuals(task, 4)
  expected = CUDNN_CALLS[name] if dtype == "bfloat16" and probe_passes else set()
  assert set(seen) == expected


def test_cudnn_probe_fails_on_a_cpu_and_is_asked_once_per_signature():
  attention.cudnn_runs.cache_clear()
  assert not attention.cudnn_runs((2, 8, 2, 16), 8, "bfloat16", None)
  assert not attention.cudnn_runs((2, 8, 2, 16), 8, "bfloat16", None)
  assert attention.cudnn_runs.cache_info().hits == 1


def attention_sized(residuals, seq_len: int) -> list:
  """The residuals whose last two axes are (T, T) or (T, 2T) or (2T, 2T): attention
  probabilities or scores."""
  sizes = {(a, b) for a in (seq_len, 2 * seq_len) for b in (seq_len, 2 * seq_len)}
  return [r for r in residuals if r[0][-2:] in sizes]


@pytest.mark.parametrize("name", STEP_CONFIGS)
@pytest.mark.parametrize("implementation", ["auto", "xla"])
def test_a_block_step_keeps_no_attention_matrix(name, implementation):
  """With "auto" (recompute on a CPU) nothing (..., T, T) is saved for the backward pass;
  with "xla", the former attention, every task's step saves some (so the check bites)."""
  config, seq_len = STEP_CONFIGS[name]()
  config.model.attention = implementation
  if config.task in ("language", "recurrent_depth"):
    config, _ = tasks.load_data(config_lib.validate(config))
  task = tasks.build(config_lib.validate(config))
  found = attention_sized(profiling.saved_residuals(task, 4), seq_len)
  if implementation == "auto":
    assert not found, found
  else:
    assert found


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_a_bfloat16_block_step_saves_its_activations_in_bfloat16(name):
  """Every array of a bfloat16 block step's backward pass that carries features (its
  last axis the width, the MLP's 4x, a head's dimension) is bfloat16; float32 is left
  to softmax statistics (a log-sum-exp per head), norm statistics and the loss, which
  work on the float32 that leaves the network. Before, the masked LM's blank selection
  and the recurrent network's state and inputs were saved in float32."""
  config, seq_len = STEP_CONFIGS[name]()
  config.model.dtype = "bfloat16"
  if config.task in ("language", "recurrent_depth"):
    config, _ = tasks.load_data(config_lib.validate(config))
  task = tasks.build(config_lib.validate(config))
  d, heads = config.model.hidden_size, config.model.num_heads
  features = {d, 4 * d, d // heads}
  batch = 4
  carrying = [(shape, dtype, where) for shape, dtype, where in profiling.saved_residuals(
      task, batch) if shape and shape[-1] in features and np.prod(shape) >= batch * seq_len]
  assert any(r[1] == jnp.bfloat16 for r in carrying)
  assert [r for r in carrying if r[1] in (np.float32, np.float64)] == []


def _six_layer_step_bytes(implementation: str) -> int:
  config, _ = image_config()
  config.model.num_layers, config.diffusion.num_blocks = 6, 2
  config.model.attention = implementation
  return profiling.train_step_memory(tasks.build(config_lib.validate(config)), 32)["step_bytes"]


def test_recompute_lowers_the_compiled_step_memory(monkeypatch):
  """What the CPU compiler allocates follows: the 6-layer block's step at 64 tokens takes
  about half of plain XLA's (0.51x measured), and the CPU's cotangent tie is what gets
  it there: with the barrier alone the CPU compiler keeps recomputed arrays from the
  forward pass (0.86x of XLA's with the tie)."""
  xla, recompute = (_six_layer_step_bytes(i) for i in ("xla", "recompute"))
  assert recompute < 0.6 * xla, (recompute, xla)
  monkeypatch.setattr(fused, "after_cotangent",
                      lambda residuals, cotangent: jax.lax.optimization_barrier(
                          (residuals, cotangent)))
  assert recompute < 0.7 * _six_layer_step_bytes("recompute")


@pytest.mark.parametrize("implementation", ["recompute", "xla"])
def test_keys_in_parts_equal_plain_attention_over_their_concatenation(implementation):
  """A key-value context passed as parts (the noisy stream against the clean keys) gives
  the values of plain attention over the concatenated keys (float64, written out) and
  the gradients of XLA's attention over them: references that share no code with the
  parts path (a single array under NoisyStream is split into the same parts inside)."""
  q, k, v = inputs(T, 2 * T)
  allowed = MASKS["noisy_stream"][3]
  parts = lambda a: (a[:, :T], a[:, T:])
  split = lambda q, k, v: attention.attend(q, parts(k), parts(v), attention.NOISY_STREAM,
                                           implementation)
  np.testing.assert_allclose(split(q, k, v), plain_attention(q, k, v, allowed), atol=1e-6)
  reference = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=jnp.asarray(allowed)[None, None], implementation="xla")
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  for a, b in zip(jax.grad(loss(split), (0, 1, 2))(q, k, v),
                  jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("num_rows", [6, 7])   # 7: the last chunk overlaps the one before
@pytest.mark.parametrize("mask_name", ["none", "causal", "noisy_stream"])
def test_recompute_in_query_chunks_equals_plain_attention(monkeypatch, mask_name, num_rows):
  """Sequences longer than QUERY_CHUNK run a chunk of query rows at a time, forward and
  backward: the same values and gradients."""
  monkeypatch.setattr(attention, "QUERY_CHUNK", 3)
  mask = MASKS[mask_name][0]
  rows = np.arange(num_rows)[:, None]
  num_keys = 2 * num_rows if mask_name == "noisy_stream" else num_rows
  allowed = (np.ones((num_rows, num_keys), bool) if mask is None
             else np.asarray(mask.allows(rows, np.arange(num_keys)[None], num_keys)))
  q, k, v = inputs(num_rows, num_keys)
  ours = lambda q, k, v: attention.attend(q, k, v, mask, "recompute")
  np.testing.assert_allclose(ours(q, k, v), plain_attention(q, k, v, allowed), atol=1e-5)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(weights * fn(q, k, v))
  reference = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=jnp.asarray(allowed)[None, None])
  for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v),
                  jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-5)
