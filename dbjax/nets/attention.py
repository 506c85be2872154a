"""Attention, in one place, that keeps no (heads, T, S) matrix for the backward pass.

Every network here attends through `attend` (dbjax.nets.dit.DiTLayer, and through its
layers the ViT, the token networks and the recurrent-depth network), and the config's
`model.attention` chooses how:

- "recompute": FlashAttention's backward pass (Dao et al. 2022, Sec. 3.1 and App. B.4;
  Dao 2023, Alg. 2) in plain XLA operations. The forward pass keeps q, k, v, the output
  and each row's log-sum-exp; the backward pass recomputes the probabilities from them.
  Both passes take at most QUERY_CHUNK query rows at a time, so a temporary holds a
  chunk's scores, not all T rows'. Any backend, any dtype, every mask below. It costs
  one more (T, S) product than autodiff (the scores), and saves (heads, T, S) floats per
  layer: at T = 257 and 12 heads, 3.2 MB per example and layer in float32.
- "cudnn": cuDNN's fused attention (jax.nn.dot_product_attention(implementation=
  "cudnn")), whose scores live only in on-chip memory: GPUs, bfloat16 or float16, no
  mask or the causal one.
- "auto" (the default): "cudnn" where it applies and a probe of the call's signature
  compiles and runs (`cudnn_runs`), "recompute" everywhere else (CPU, TPU, float32, the
  block-diffusion masks' noisy rows).
- "xla": jax.nn.dot_product_attention's XLA path, which keeps each layer's
  probabilities for the backward pass (dbjax's attention before this module): to
  compare with.

On a TPU "auto" runs "recompute", plain XLA. A Pallas kernel (jax.experimental.pallas's
TPU flash or splash attention) would be one more implementation here, chosen by `_choose`
for TPUs, with the masks' `allows` as its block-sparsity pattern.

Masks are structured, never arrays the step carries: each says which (row, column)
pairs may attend, evaluated on index grids inside the computation, so no (T, S) mask is
stored or broadcast. An array mask (the key-value cache's valid columns, one row of
queries at a time, no backward pass) takes the XLA path.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dbjax.nets import fused

IMPLEMENTATIONS = ("auto", "recompute", "cudnn", "xla")

# Scores of masked pairs. Finite, so a row's maximum and log-sum-exp stay finite, and
# exp(masked - lse) is 0 for any row that has an allowed column.
_MASKED = float(np.finfo(np.float32).min)


# ------------------------------------------------------------------------ the masks


class Mask:
  """Which (row, column) pairs may attend. Subclasses are frozen dataclasses: static
  values that jit and custom_vjp take as they are."""

  def allows(self, rows, cols, num_keys):
    """True where query row `rows` may attend to key column `cols` (integer arrays that
    broadcast together), of num_keys columns in all."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Row i attends to columns j <= i (rows and columns over the same positions)."""

  def allows(self, rows, cols, num_keys):
    del num_keys
    return cols <= rows


@dataclasses.dataclass(frozen=True)
class NoisyStream(Mask):
  """The autoregressive block's noisy rows (paper, App. E: a block-diffusion mask with
  blocks of one token): columns are [clean (T); noisy (T)], and noisy row i attends to
  the clean columns j < i and to its own noisy key, column T + i."""

  def allows(self, rows, cols, num_keys):
    return (cols < rows) | (cols == rows + num_keys // 2)


@dataclasses.dataclass(frozen=True)
class BlockDiffusion(Mask):
  """[clean (T); noisy (T)] against itself: clean rows causal over the clean columns,
  noisy rows as NoisyStream. `attend` runs it as those two parts, so the empty quarter
  (clean rows, noisy columns) and the noisy columns other than a row's own are never
  computed: 2T^2 + T scores, not (2T)^2."""

  def allows(self, rows, cols, num_keys):
    t = num_keys // 2
    return jnp.where(rows < t, cols <= rows, (cols < rows - t) | (cols == rows))


@dataclasses.dataclass(frozen=True)
class _StrictlyCausal(Mask):
  """Row i attends to columns j < i (NoisyStream's clean part)."""

  def allows(self, rows, cols, num_keys):
    del num_keys
    return cols < rows


_STRICTLY_CAUSAL = _StrictlyCausal()


CAUSAL, NOISY_STREAM, BLOCK_DIFFUSION = Causal(), NoisyStream(), BlockDiffusion()


def dense_mask(mask, num_queries: int, num_keys: int) -> jax.Array:
  """(num_queries, num_keys) booleans of a structured mask, True where a row attends."""
  rows = jnp.arange(num_queries)[:, None]
  return jnp.broadcast_to(mask.allows(rows, jnp.arange(num_keys)[None], num_keys),
                          (num_queries, num_keys))


# -------------------------------------------------------------------------- attend


def attend(q, k, v, mask=None, implementation: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim), where mask allows) v per head.

  q (N, T, heads, head_dim); k, v (N, S, heads, head_dim), or tuples of such arrays
  whose concatenation along S they stand for (a key-value context before the rows' own
  keys: "recompute" keeps the parts, not a concatenated copy); mask None (every pair), a
  structured mask above, or a boolean array broadcastable to (T, S). Returns
  (N, T, heads, head_dim) in q's dtype. Scores, softmax and log-sum-exp are float32
  whatever the inputs' dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  if isinstance(mask, BlockDiffusion):
    t = q.shape[1] // 2
    clean = attend(q[:, :t], k[:, :t], v[:, :t], CAUSAL, implementation)
    noisy = attend(q[:, t:], (k[:, :t], k[:, t:]), (v[:, :t], v[:, t:]), NOISY_STREAM,
                   implementation)
    return jnp.concatenate([clean, noisy], 1)
  k_parts = tuple(k) if isinstance(k, (tuple, list)) else (k,)
  v_parts = tuple(v) if isinstance(v, (tuple, list)) else (v,)
  joined = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  if mask is not None and not isinstance(mask, Mask):
    return _xla(q, joined(k_parts), joined(v_parts), jnp.asarray(mask, bool))
  num_keys = sum(part.shape[1] for part in k_parts)
  chosen = _choose(implementation, q, num_keys, mask)
  if chosen == "cudnn":
    keys = joined(k_parts)
    return jax.nn.dot_product_attention(q, keys, joined(v_parts),
                                        **_cudnn_mask(mask, q.shape[1], keys.shape[1]),
                                        implementation="cudnn")
  if chosen == "xla":
    keys = joined(k_parts)
    return _xla(q, keys, joined(v_parts),
                None if mask is None else dense_mask(mask, q.shape[1], keys.shape[1]))
  if isinstance(mask, NoisyStream) and len(k_parts) == 1:  # [clean; noisy] as one array
    k_parts, v_parts = tuple(jnp.split(k, 2, axis=1)), tuple(jnp.split(v, 2, axis=1))
  return recompute_attention(q, k_parts, v_parts, mask)


def _cudnn_mask(mask, num_queries: int, num_keys: int) -> dict:
  """cuDNN's arguments for a structured mask: is_causal for Causal (its own fast path),
  a dense boolean mask for the others (NoisyStream's noisy rows attend to their own
  noisy key and the earlier clean ones, which no flag says), nothing for None."""
  if mask is None:
    return {}
  if isinstance(mask, Causal):
    return {"is_causal": True}
  return {"mask": dense_mask(mask, num_queries, num_keys)[None, None]}


def _choose(implementation: str, q, num_keys: int, mask) -> str:
  """The implementation "auto" resolves to for these queries, keys and mask: "cudnn"
  where cuDNN takes them (a GPU, 16-bit floats, no mask or the causal one, a head
  dimension it supports) and a probe of exactly this signature compiled and ran, else
  "recompute"."""
  if implementation != "auto":
    return implementation
  cudnn_takes = (jax.default_backend() == "gpu"
                 and q.dtype in (jnp.bfloat16, jnp.float16)
                 and (mask is None or isinstance(mask, Causal))
                 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)
  signature = (tuple(q.shape), num_keys, jnp.dtype(q.dtype).name, mask)
  return "cudnn" if cudnn_takes and cudnn_runs(*signature) else "recompute"


@functools.cache
def cudnn_runs(q_shape: tuple, num_keys: int, dtype: str, mask) -> bool:
  """Whether cuDNN's attention, forward and backward, compiles and runs on this GPU for
  queries of q_shape and num_keys keys: it refuses some signatures only when compiled or
  run ("No valid engine configs", jax-ml/jax issues 20438 and 23227), which in a train
  step would stop the run instead of falling back. So "auto" probes each signature once,
  on zeros of one call's size, before it builds cuDNN into a step."""
  q = np.zeros(q_shape, dtype)
  k = np.zeros((q_shape[0], num_keys, *q_shape[2:]), dtype)

  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, **_cudnn_mask(mask, q_shape[1], num_keys),
                                       implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))
  try:
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, k).compile()
    with jax.ensure_compile_time_eval():  # run now, even while a step is being traced
      jax.block_until_ready(compiled(q, k, k))
  except Exception:  # pylint: disable=broad-exception-caught
    return False  # cuDNN's refusals come as ValueError, NotImplementedError, XlaRuntimeError
  return True


def _xla(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[None, None])


# ---------------------------------------------------------------------- recompute


# Query rows per chunk of the recompute path: the (N, heads, rows, S) float32 scores,
# probabilities and their cotangents of one chunk are the largest temporaries of either
# pass, so longer sequences run in ceil(T / QUERY_CHUNK) equal chunks (at T = 257 and
# batch 128 with 12 heads, three chunks of 86 rows, 130 MiB per array, instead of 387).
QUERY_CHUNK = 128


def _scores(q, k, mask, rows) -> jax.Array:
  """Scaled scores (N, heads, rows, S) in float32 of query rows `rows` (their positions
  among all rows), masked pairs at _MASKED."""
  scores = jnp.einsum("nthd,nshd->nhts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / np.sqrt(q.shape[-1]))
  if mask is None:
    return scores
  allowed = mask.allows(rows[:, None], jnp.arange(k.shape[1])[None], k.shape[1])
  return jnp.where(allowed, scores, _MASKED)


def _parts(k_parts, v_parts, mask):
  """(dense keys, dense values, own keys, own values, the dense part's mask).

  Under NoisyStream row i attends to clean columns j < i and to one more key, its own
  (the second part): that key enters as a per-row score, so the scores are T x (T + 1)
  rather than T x 2T, the half of the noisy columns the mask empties never computed.
  Otherwise every part is dense and the own key is None."""
  if isinstance(mask, NoisyStream):
    (k_clean, k_own), (v_clean, v_own) = k_parts, v_parts
    return k_clean, v_clean, k_own, v_own, _STRICTLY_CAUSAL
  return (jnp.concatenate(k_parts, axis=1), jnp.concatenate(v_parts, axis=1), None, None,
          mask)


def _per_row(a):
  """(N, heads, T) -> (N, T, heads, 1): a per-row number against (N, T, heads, head_dim)."""
  return jnp.moveaxis(a, 1, 2)[..., None]


def _chunk_forward(q, k_own, v_own, rows, k, v, mask):
  """Output (N, rows, heads, head_dim) and log-sum-exp (N, rows, heads) of some query
  rows; k_own, v_own: their own keys and values, or None."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  scores = _scores(q, k, mask, rows)
  row_max = jnp.max(scores, axis=-1)
  if k_own is not None:
    own = jnp.einsum("nthd,nthd->nht", q, k_own, preferred_element_type=jnp.float32) * scale
    row_max = jnp.maximum(row_max, own)
  unnormalised = jnp.exp(scores - row_max[..., None])
  row_sum = jnp.sum(unnormalised, axis=-1)
  out = jnp.einsum("nhts,nshd->nthd", unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  if k_own is not None:
    own_weight = jnp.exp(own - row_max)
    row_sum = row_sum + own_weight
    out = out + _per_row(own_weight) * v_own.astype(jnp.float32)
  out = out / _per_row(row_sum)
  return out.astype(q.dtype), jnp.moveaxis(row_max + jnp.log(row_sum), 1, 2)


def _chunk_backward(q, k_own, v_own, out, log_sum_exp, d_out, rows, k, v, mask):
  """(dq, dk, dv, d k_own, d v_own) in float32 from some query rows; dk and dv are their
  share of the dense keys' and values' cotangents (FlashAttention-2, Alg. 2)."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  log_sum_exp = jnp.moveaxis(log_sum_exp, 1, 2)                        # (N, heads, rows)
  probs = jnp.exp(_scores(q, k, mask, rows) - log_sum_exp[..., None])  # (N, heads, rows, S)
  d_v = jnp.einsum("nhts,nthd->nshd", probs.astype(d_out.dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("nthd,nshd->nhts", d_out, v, preferred_element_type=jnp.float32)
  # sum_s P_ts dP_ts = sum_d dO_td O_td (FlashAttention-2, Sec. 2.2, the backward pass).
  row_dot = jnp.einsum("nthd,nthd->nht", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_scores = probs * (d_probs - row_dot[..., None]) * scale
  d_q = jnp.einsum("nhts,nshd->nthd", d_scores.astype(k.dtype), k,
                   preferred_element_type=jnp.float32)
  d_k = jnp.einsum("nhts,nthd->nshd", d_scores.astype(q.dtype), q,
                   preferred_element_type=jnp.float32)
  if k_own is None:
    return d_q, d_k, d_v, None, None
  own = jnp.einsum("nthd,nthd->nht", q, k_own, preferred_element_type=jnp.float32) * scale
  own_probs = jnp.exp(own - log_sum_exp)                              # (N, heads, rows)
  d_own_probs = jnp.einsum("nthd,nthd->nht", d_out, v_own, preferred_element_type=jnp.float32)
  d_own = _per_row(own_probs * (d_own_probs - row_dot) * scale)
  return (d_q + d_own * k_own.astype(jnp.float32), d_k, d_v, d_own * q.astype(jnp.float32),
          _per_row(own_probs) * d_out.astype(jnp.float32))


def _row_chunks(num_rows: int) -> tuple[int, int]:
  """(chunks, rows per chunk) of num_rows query rows: equal chunks of at most
  QUERY_CHUNK rows, the last one moved back to end at the last row (`_chunk_start`)."""
  count = -(-num_rows // QUERY_CHUNK)
  return count, -(-num_rows // count)


def _chunk_start(chunk, size: int, num_rows: int):
  """Where chunk `chunk` of `size` rows starts: chunk x size, but no later than
  num_rows - size, so every chunk is a window of the arrays as they are (no padded or
  transposed copies; at T = 257 three chunks of 86, the last starting at row 171)."""
  return jnp.minimum(chunk * size, num_rows - size)


def _rows(tree, start, size: int):
  """Rows start .. start + size of arrays (N, T, ...) (None stays None)."""
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), tree)


def _forward(q, k_parts, v_parts, mask):
  """(output (N, T, heads, head_dim), log-sum-exp (N, T, heads) float32), one chunk of
  query rows at a time, each written into the output in place."""
  k, v, k_own, v_own, dense_part_mask = _parts(k_parts, v_parts, mask)
  num_rows = q.shape[1]
  count, size = _row_chunks(num_rows)

  def chunk(i, outputs):  # rows the last chunk shares with the one before get equal values
    start = _chunk_start(i, size, num_rows)
    results = _chunk_forward(*_rows((q, k_own, v_own), start, size), start + jnp.arange(size),
                             k, v, dense_part_mask)
    return tuple(jax.lax.dynamic_update_slice_in_dim(a, r, start, axis=1)
                 for a, r in zip(outputs, results))
  # zeros_like: under shard_map the buffers vary over the mesh axes q varies over.
  return jax.lax.fori_loop(0, count, chunk, (jnp.zeros_like(q),
                                             jnp.zeros_like(q[..., 0], jnp.float32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def recompute_attention(q, k_parts: tuple, v_parts: tuple, mask=None) -> jax.Array:
  """Attention whose backward pass recomputes the probabilities (see the module
  docstring); keys and values as tuples of parts along the key axis, kept as they are
  (under NoisyStream: the clean part and the rows' own keys); mask: None or a
  structured mask."""
  return _forward(q, k_parts, v_parts, mask)[0]


def _recompute_forward(q, k_parts, v_parts, mask):
  out, log_sum_exp = _forward(q, k_parts, v_parts, mask)
  return out, (q, k_parts, v_parts, out, log_sum_exp)


def _recompute_backward(mask, residuals, d_out):
  # Tied to the output's cotangent, so XLA can neither run the recomputation during the
  # forward pass nor share it with the forward pass's scores, either of which would keep
  # a (heads, T, S) array alive between the two passes.
  (q, k_parts, v_parts, out, log_sum_exp), d_out = fused.after_cotangent(residuals, d_out)
  k, v, k_own, v_own, dense_part_mask = _parts(k_parts, v_parts, mask)
  num_rows = q.shape[1]
  count, size = _row_chunks(num_rows)

  def chunk(i, sums):
    # Every gradient is a sum over query rows, so each chunk adds its rows' share; rows
    # an earlier chunk has done get a zero cotangent here, hence add nothing.
    start = _chunk_start(i, size, num_rows)
    rows = start + jnp.arange(size)
    q_c, k_own_c, v_own_c, out_c, lse_c, d_out_c = _rows(
        (q, k_own, v_own, out, log_sum_exp, d_out), start, size)
    d_out_c = jnp.where((rows >= i * size)[None, :, None, None], d_out_c, 0)
    shares = _chunk_backward(q_c, k_own_c, v_own_c, out_c, lse_c, d_out_c, rows, k, v,
                             dense_part_mask)
    def add_rows(a, share):  # share's rows onto a's at start (a per-row gradient)
      return None if a is None else jax.lax.dynamic_update_slice_in_dim(
          a, _rows(a, start, size) + share, start, axis=1)
    d_q, d_k, d_v, d_k_own, d_v_own = sums
    return (add_rows(d_q, shares[0]), d_k + shares[1], d_v + shares[2],
            add_rows(d_k_own, shares[3]), add_rows(d_v_own, shares[4]))
  zeros = lambda a: None if a is None else jnp.zeros_like(a, jnp.float32)
  d_q, d_k, d_v, d_k_own, d_v_own = jax.lax.fori_loop(
      0, count, chunk, tuple(map(zeros, (q, k, v, k_own, v_own))))
  if k_own is None:
    ends = np.cumsum([part.shape[1] for part in k_parts])[:-1]
    d_k_parts, d_v_parts = jnp.split(d_k, ends, axis=1), jnp.split(d_v, ends, axis=1)
  else:
    d_k_parts, d_v_parts = (d_k, d_k_own), (d_v, d_v_own)
  return (d_q.astype(q.dtype), tuple(d.astype(k.dtype) for d in d_k_parts),
          tuple(d.astype(v.dtype) for d in d_v_parts))


recompute_attention.defvjp(_recompute_forward, _recompute_backward)
