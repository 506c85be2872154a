r"""Bytes per token that one DiT layer keeps for its backward pass, dbjax against PyTorch.

dbjax's figure is read from the program (jax.ad_checkpoint.print_saved_residuals via
profiling.residuals_of): every array the layer's backward pass keeps, its input
included, the parameters and per-example conditioning left out. PyTorch's is a count of
the tensors its autograd saves for the same layer written as DiT's block (LayerNorm
without affine, modulation, qkv Linear, SDPA with a fused kernel, proj Linear, gate; the
same for the MLP with GELU(tanh)), op by op (PYTORCH_SAVED); it is not a measurement.

  python -m benchmarks.bench_layer_residuals --out=benchmarks/results/bench_layer_residuals.json

Defaults: the authors' larger ViT size (width 768, 12 heads, 256 tokens, MLP 3072).
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dbjax.engine import profiling
from dbjax.nets.dit import DiTConfig, DiTLayer
from experiments.cli import print_table, run, write_json

_WIDTH = flags.DEFINE_integer("width", 768, "hidden size D")
_HEADS = flags.DEFINE_integer("heads", 12, "attention heads")
_TOKENS = flags.DEFINE_integer("tokens", 256, "tokens T")
_MLP = flags.DEFINE_integer("mlp", 3072, "MLP width")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_layer_residuals.json", "JSON output")

# What PyTorch's autograd saves per token for one DiT layer, in units of D (the width)
# and of single numbers, from each op's derivative: LayerNorm its input and two
# statistics; x * (1 + scale) the normalised x; a Linear its input; SDPA (flash or
# memory-efficient) q, k, v (views of the qkv output), the output and a log-sum-exp per
# head; the transposed output is copied for proj; a gate its other operand; GELU its
# input. The MLP's hidden width is `mlp`.
PYTORCH_SAVED = (
    ("norm1 input", "D"), ("norm1 mean, rstd", "2"), ("modulated x_hat", "D"),
    ("qkv input", "D"), ("q, k, v", "3D"), ("attention output", "D"),
    ("attention log-sum-exp", "heads"), ("proj input (a copy)", "D"), ("proj output (gate)", "D"),
    ("norm2 input", "D"), ("norm2 mean, rstd", "2"), ("modulated x_hat", "D"),
    ("fc1 input", "D"), ("GELU input", "M"), ("fc2 input", "M"), ("fc2 output (gate)", "D"))


def pytorch_numbers_per_token(width: int, heads: int, mlp: int) -> int:
  """Numbers PYTORCH_SAVED keeps per token; the log-sum-exp and statistics are float32."""
  sizes = {"D": width, "3D": 3 * width, "M": mlp, "heads": heads, "2": 2}
  return sum(sizes[size] for _, size in PYTORCH_SAVED)


def dbjax_bytes_per_token(attention: str, dtype: str) -> float:
  """Bytes one DiTLayer keeps for its backward pass, per token (batch of 2)."""
  cfg = DiTConfig(hidden_size=_WIDTH.value, num_heads=_HEADS.value,
                  mlp_ratio=_MLP.value / _WIDTH.value, dtype=dtype, attention=attention)
  graph, params = nnx.split(nnx.eval_shape(lambda: DiTLayer(cfg, rngs=nnx.Rngs(0))))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  batch, tokens = 2, _TOKENS.value
  x = jnp.zeros((batch, tokens, _WIDTH.value), dtype)
  cond = jnp.zeros((batch, _WIDTH.value), dtype)

  def loss(params, x, cond):
    # x * 1: the layer's input counts, as it would inside a stack of layers.
    out, _ = nnx.merge(graph, params)(x * 1, cond)
    return jnp.sum(out.astype(jnp.float32))

  kept = [(shape, dt, source) for shape, dt, source in profiling.residuals_of(
      loss, zeros, x, cond) if batch in shape and tokens in shape]
  # The attention's output (N, T, heads, head_dim), kept by "recompute", and its reshape
  # to (N, T, D), kept by proj, are one buffer in XLA (a reshape of a row-major array is
  # a bitcast), but jax lists both: count it once.
  if any("attention.py" in source and "_forward" in source for *_, source in kept):
    proj_input = next(i for i, (shape, _, source) in enumerate(kept)
                      if "reshape" in source and "DiTLayer.__call__" in source
                      and shape == (batch, tokens, _WIDTH.value))
    kept.pop(proj_input)
  return float(sum(np.prod(shape) * dt.itemsize for shape, dt, _ in kept)) / (batch * tokens)


def main(argv):
  del argv
  rows = []
  numbers = pytorch_numbers_per_token(_WIDTH.value, _HEADS.value, _MLP.value)
  stats = 4 + _HEADS.value  # float32 in both dtypes
  for dtype, size in (("float32", 4), ("bfloat16", 2)):
    pytorch = (numbers - stats) * size + stats * 4
    for attention in ("xla", "auto"):
      ours = dbjax_bytes_per_token(attention, dtype)
      rows.append({"dtype": dtype, "attention": attention, "dbjax_bytes_per_token": ours,
                   "pytorch_bytes_per_token": pytorch, "dbjax_over_pytorch": ours / pytorch})
  print(f"one DiT layer, width {_WIDTH.value}, {_HEADS.value} heads, {_TOKENS.value} tokens, "
        f"MLP {_MLP.value}: bytes kept per token for the backward pass")
  print_table(rows, list(rows[0]))
  write_json(_OUT.value, {"width": _WIDTH.value, "heads": _HEADS.value,
                          "tokens": _TOKENS.value, "mlp": _MLP.value,
                          "pytorch_saved": [list(item) for item in PYTORCH_SAVED],
                          "rows": rows})


if __name__ == "__main__":
  run(main)
