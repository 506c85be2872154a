"""Text quality as the paper scores its language models: on samples, not on a likelihood.

The paper reports MAUVE (Pillutla et al. 2021) of generated against real continuations,
with GPT-2's features, and generative perplexity under GPT-2. No pretrained LM is
available offline, so the judge here is an end-to-end causal LM trained on the training
split only (dbjax.tasks.language.causal.CausalLM: the Shakespeare autoregressive
baseline). It is not GPT-2: its figures compare methods scored by the same judge, not
with the paper's.

- Features of a text: the judge's last layer's output (before its adaLN head), averaged
  over the positions whose inputs are the continuation's characters (position i reads
  the characters before i), one vector per text.
- Generative bits per character: the judge's cross-entropy of the continuation's
  tokens given everything before them, in bits, over the characters they decode to (per
  token = per character for a character run).
- Diversity: the unigram entropy (bits) of the words (split on whitespace) and
  distinct-n (distinct word n-grams / all word n-grams, n = 2, 3, 4), which catch the
  degenerate repetition that scores a low perplexity ("the the the").
- MAUVE: mauve-text's compute_mauve on those features: k-means over their PCA into
  NUM_BUCKETS = 16 buckets (mauve-text's default is n / 10: at 256 texts a side it gave
  real against real text 0.90 to 0.95 from one draw to the next with the tests' judge, 16
  buckets 0.96 to 0.99, with random characters at 0.005 either way), scaling factor 5.
"""
import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbjax.errors import ConfigError
from dbjax.eval import plots
from dbjax.tasks.language.causal import CausalLM, causal_hidden
from dbjax.tasks.language.common import token_embedding


@functools.partial(jax.jit, static_argnames=("judge", "prompt_length"))
def _judge(judge, params, shared_params, tokens, prompt_length):
  net = judge.network(params)
  hidden, cond = causal_hidden(judge, net, token_embedding(shared_params), tokens)
  logits = net.head(hidden, cond)
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)[:, prompt_length:]
  pooled = hidden[:, prompt_length + 1:] if tokens.shape[1] > prompt_length + 1 else hidden
  return jnp.mean(pooled.astype(jnp.float32), axis=1), jnp.mean(nats, axis=1) / math.log(2)


def judge_texts(judge: CausalLM, params, shared_params, tokens: np.ndarray,
                prompt_length: int, batch_size: int = 64):
  """(features (N, D), mean bits per token of each continuation (N,)) of texts `tokens`
  (N, P + L): prompt_length P tokens of prompt, then the continuation."""
  if not isinstance(judge, CausalLM):
    raise ConfigError(f"the judge must be an end-to-end causal LM (a language run trained "
                      f"with method=end_to_end, kind=autoregressive); got "
                      f"{type(judge).__name__}")
  tokens = np.asarray(tokens, np.int32)
  if tokens.shape[1] > judge.net.seq_len:
    raise ConfigError(f"texts of {tokens.shape[1]} characters are longer than the judge's "
                      f"seq_len={judge.net.seq_len}")
  features, bits = [], []
  for start in range(0, len(tokens), batch_size):
    batch = tokens[start:start + batch_size]
    padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])
    f, b = _judge(judge, params, shared_params, jnp.asarray(padded), prompt_length)
    features.append(np.asarray(f)[:len(batch)])
    bits.append(np.asarray(b)[:len(batch)])
  return np.concatenate(features), np.concatenate(bits)


def held_out_texts(tokens: np.ndarray, count: int, length: int, seed: int) -> np.ndarray:
  """`count` test sequences, cut to `length`, in a fixed order drawn from `seed`: the
  real texts whose prompts a model continues and whose continuations it is scored
  against (experiments/text_quality.py)."""
  if count > len(tokens):
    raise ConfigError(f"--num_samples={count}: the test split holds {len(tokens)} sequences")
  rows = np.random.default_rng([seed, 7]).permutation(len(tokens))[:count]
  return np.asarray(tokens)[rows, :length]


NUM_BUCKETS = 16


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25,
                num_buckets: int = NUM_BUCKETS) -> float:
  """MAUVE of q (generated) against p (real), from given features."""
  import mauve  # pylint: disable=g-import-not-at-top  (mauve-text, with faiss-cpu)
  return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed,
                                   num_buckets=num_buckets, verbose=False).mauve)


def diversity(texts: list[str]) -> dict:
  """Word unigram entropy (bits) and distinct-2/3/4 of a set of texts."""
  words = [text.split() for text in texts]
  counts = collections.Counter(w for ws in words for w in ws)
  total = sum(counts.values())
  entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
  result = {"unigram_entropy_bits": entropy}
  for n in (2, 3, 4):
    grams = [tuple(ws[i:i + n]) for ws in words for i in range(len(ws) - n + 1)]
    result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
  return result


def per_character(bits: np.ndarray, texts: np.ndarray, prompt_length: int, decode):
  """Each continuation's mean bits per token (judge_texts) as bits per character of the
  text it decodes to: the same figure for a character run, comparable with one for a
  subword run (dbjax.data.tokenizers)."""
  length = texts.shape[1] - prompt_length
  characters = np.array([max(len(decode(t[prompt_length:])), 1) for t in texts])
  return np.asarray(bits) * length / characters


def score(judge, judge_params, judge_shared, real: np.ndarray, generated: np.ndarray,
          prompt_length: int, decode, seed: int = 25) -> dict:
  """Every measure of `generated` against `real` texts (N, P + L) of token ids that share
  their first prompt_length tokens; decode(ids) -> str."""
  real_features, real_bits = judge_texts(judge, judge_params, judge_shared, real,
                                         prompt_length)
  features, bits = judge_texts(judge, judge_params, judge_shared, generated, prompt_length)
  real_bits = per_character(real_bits, real, prompt_length, decode)
  bits = per_character(bits, generated, prompt_length, decode)
  real_diversity = diversity([decode(t[prompt_length:]) for t in real])
  generated_diversity = diversity([decode(t[prompt_length:]) for t in generated])
  return {"mauve": mauve_score(real_features, features, seed),
          "generative_bits_per_character": float(np.mean(bits)),
          "real_bits_per_character": float(np.mean(real_bits)),
          **generated_diversity,
          **{f"real_{k}": v for k, v in real_diversity.items()}}


# The measures plotted against K, and their axis names.
CURVE_MEASURES = {"mauve": "MAUVE",
                  "generative_bits_per_character": "generative bits per character",
                  "distinct_2": "distinct-2"}


def save_curves(curves: dict, path_prefix: str) -> list[str]:
  """<path_prefix>_<measure>.png for each of CURVE_MEASURES: one line per model of
  curves {label: {K: scored row}}. Returns the paths written."""
  paths = []
  for measure, name in CURVE_MEASURES.items():
    paths.append(f"{path_prefix}_{measure}.png")
    plots.save_metric_lines({label: {k: row[measure] for k, row in cells.items()}
                             for label, cells in curves.items()},
                            paths[-1], "K (iterations or denoising calls)", name)
  return paths
