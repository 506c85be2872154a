"""Character-level language modelling (paper, App. E): the autoregressive DiffusionBlocks
LM against a causal transformer, and masked diffusion (MD4) as blocks against MD4 end to
end. `build` picks the model from config.language.kind and config.method; `load_data`
reads the text and fills in data.vocab_size. See dbjax.tasks.language.common."""

import os

import ml_collections
import numpy as np
from flax import nnx

from dbjax.config import check_choices, check_field, num_trained_blocks, shared_updates
from dbjax.data import text, token_files, tokenizers
from dbjax.engine.state import make_optimizer, shared_optimizer
from dbjax.errors import ConfigError
from dbjax.nets.lm import LMConfig, LMNet
from dbjax.tasks.base import RunData, noise_plan
from dbjax.tasks.language.autoregressive import AutoregressiveDenoiser
from dbjax.tasks.language.causal import CausalLM
from dbjax.tasks.language.common import LanguageTask, token_embedding
from dbjax.tasks.language import single_stream
from dbjax.tasks.language.masked import MaskedDiffusion, masking_boundaries


# ------------------------------------------------------------------------ config

LANGUAGE_CHOICES = {
    "kind": ("autoregressive", "masked"),
    "token_embedding": ("frozen", "joint"),
    "bridge": ("argmax", "expected"),
    "positions": ("learned", "rotary"),
}


def config_sections() -> dict:
  """This task's own config section and its defaults (dbjax.config.default_config adds
  it to the fields every run has)."""
  return {"language": ml_collections.ConfigDict(dict(
      # "autoregressive": blocks denoise the embedding of token i given the clean tokens
      # before it. "masked": MD4 masked diffusion, block b owns masking levels
      # t in [1 - (b+1)/B, 1 - b/B].
      kind="autoregressive",
      seq_len=128,               # characters per training sequence (and generated text)
      # The token embedding (the target space): "frozen" at its random initialisation
      # (blocks stay independent) or "joint", trained with whichever block is active.
      token_embedding="frozen",
      # The Euler bridge of the autoregressive chain: "expected", the probability-flow
      # ODE, whose end is distributed as the target, or "argmax" (as the classifier's),
      # a near-greedy decoder: every temperature and top-p give its greedy text, MAUVE
      # 0.13 against 0.79 (docs/language.md, Results).
      bridge="expected",
      # Positions: "learned", an embedding added to the input, or "rotary", queries and
      # keys rotated in every layer (Llama-style, as the paper's LM blocks). A noisy row's
      # input is noise at high sigma, so an added position is drowned (docs/language.md).
      positions="learned",
      # Autoregressive, dbjax's option (not the paper's): the share of block 0's training
      # sequences drawn at sigma_max, where every chain's first call runs (with N = B, its
      # only call); the log-normal puts 0.2% of its mass above sigma = 10. 0 = the paper.
      sigma_max_share=0.0,
      # Autoregressive DiffusionBlocks: the layers run the clean stream, then the noisy one
      # against each layer's clean keys and values, and the clean pass is recomputed in the
      # backward pass, so the step keeps the activations of T rows, not 2T: the same gradients
      # (docs/method.md, "The autoregressive LM's memory"). The other kinds and tasks have
      # one stream and ignore it.
      remat_clean_stream=False,
      inference_steps=0,         # autoregressive: denoising calls per token, 0 = B
      # autoregressive: independent chains per token whose mixed last calls estimate the
      # chain's likelihood (sampling.mixture_log_probs; docs/language.md). The estimate is
      # high unless chains >> 1 / p(true token), and costs chains x the chain: 0 = skip.
      mixture_chains=0,
      sample_steps=0,            # masked: unmasking steps from t = 1 to 0, 0 = seq_len
      prompt="",                 # generated text starts with it
      num_samples=4,             # texts generated per setting (greedy, temperature, top-p)
      temperature=0.8, top_p=0.9,
  ))}


def validate_config(config):
  """ConfigError naming the first bad field of this task's section, or of a common
  field this task reads its own way."""
  lang = config.language
  check_choices(config, "language", LANGUAGE_CHOICES)
  check_field(isinstance(lang.seq_len, int) and lang.seq_len >= 2, "language.seq_len",
              lang.seq_len, "an integer >= 2")
  for field in ("inference_steps", "sample_steps", "mixture_chains"):
    check_field(lang[field] >= 0, f"language.{field}", lang[field], ">= 0 (0 = the default)")
  check_field(0.0 <= lang.sigma_max_share <= 1.0, "language.sigma_max_share",
              lang.sigma_max_share, "in [0, 1]")
  check_field(lang.sigma_max_share == 0.0 or lang.kind == "autoregressive",
              "language.sigma_max_share", lang.sigma_max_share,
              "0 unless language.kind='autoregressive' (MD4 has no sigma)")
  check_field(lang.num_samples >= 1, "language.num_samples", lang.num_samples, ">= 1")
  check_field(lang.temperature >= 0, "language.temperature", lang.temperature,
              ">= 0 (0 = greedy)")
  check_field(0 < lang.top_p <= 1, "language.top_p", lang.top_p, "in (0, 1]")
  check_field(len(lang.prompt) < lang.seq_len, "language.prompt", lang.prompt,
              f"shorter than language.seq_len={lang.seq_len}")
  tokenizers.parse(config.data.tokenizer)  # one line for a name it cannot be
  check_field(config.data.num_classes == 10, "data.num_classes", config.data.num_classes,
              "left at its default for text runs: the vocabulary size is "
              "config.data.vocab_size (0 = from the text)")


def build(config, layer=None) -> LanguageTask:
  """The task of a validated language config whose data.vocab_size is set (`load_data`);
  with a user's causal `layer` (dbjax.wrap's token target), single_stream's."""
  if layer is not None:
    return single_stream.build(config, layer)
  m, lang = config.model, config.language
  if not config.data.vocab_size:
    raise ConfigError("config.data.vocab_size=0 is unresolved: build a language task from "
                      "the config that dbjax.tasks.load_data returns (it reads the text)")
  num_blocks = num_trained_blocks(config)
  net = LMConfig(vocab_size=config.data.vocab_size, seq_len=lang.seq_len,
                 hidden_size=m.hidden_size, num_layers=m.num_layers // num_blocks,
                 num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                 frequency_dim=m.frequency_dim, remat=m.remat, dtype=m.dtype,
                 attention=m.attention,
                 positions=lang.positions)
  train_embedding = lang.token_embedding == "joint"
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LMNet(net, rngs=nnx.Rngs(0))))
  plan, intervals = noise_plan(config, num_blocks)
  common = dict(
      num_blocks=num_blocks, optimizer=make_optimizer(config.train),
      shared_optimizer=shared_optimizer(
          config.train, shared_updates(config),
          {"token_embedding": "train" if train_embedding else "frozen"}),
      net=net, graphdef=graphdef, train_token_embedding=train_embedding,
      clean_sigma=config.diffusion.sigma_min, sigma_data=config.diffusion.sigma_data)
  if lang.kind == "masked":
    levels = masking_boundaries(num_blocks)
    return MaskedDiffusion(**common, masking_levels=levels, intervals=np.array(
        [[levels[num_blocks - 1 - b], levels[num_blocks - b]] for b in range(num_blocks)],
        np.float32))
  if config.method == "end_to_end":
    return CausalLM(**common, intervals=intervals)
  return AutoregressiveDenoiser(**common, intervals=intervals, noise=plan, bridge=lang.bridge,
                                sigma_max_share=lang.sigma_max_share,
                                remat_clean_stream=lang.remat_clean_stream)


def with_vocabulary(config, vocabulary):
  """A copy of config with data.vocab_size = the vocabulary's size."""
  config = config.copy_and_resolve_references()
  config.data.vocab_size = vocabulary.size
  return config


def resolve(config):
  """config with data.vocab_size set: as it is when set, else read from the text."""
  return config if config.data.vocab_size else load_data(config)[0]


# data.name of token files written by experiments/tokenize.py (dbjax.data.token_files).
TOKENS_PREFIX = "tokens:"


def load_data(config, workdir: str | None = None, vocabulary=None):
  """(config with data.vocab_size set, RunData of TextData) of the config's text data set
  (dbjax.data.text), encoded with `vocabulary`: default, the tokenizer saved in
  `workdir` by a run trained there (ConfigError if config.data.tokenizer names another),
  else the one config.data.tokenizer names (dbjax.data.tokenizers)."""
  d = config.data
  if d.name.startswith(TOKENS_PREFIX):  # token files: read by rows, their own tokenizer
    directory = os.path.expanduser(d.name[len(TOKENS_PREFIX):])
    train, test = token_files.load(directory, config.language.seq_len)
    tokenizers.check_same(train.vocabulary, d.tokenizer, directory, made="token files")
    tokenizers.check_same(tokenizers.saved(workdir), d.tokenizer, workdir)
    return with_vocabulary(config, train.vocabulary), RunData(train, test)
  if vocabulary is None:
    vocabulary = tokenizers.saved(workdir)
    tokenizers.check_same(vocabulary, d.tokenizer, workdir)
  train, test = text.load_text(d.name, config.language.seq_len, d.data_dir, d.max_chars,
                               vocabulary, d.tokenizer)
  return with_vocabulary(config, train.vocabulary), RunData(train, test)


__all__ = ["build", "load_data", "resolve", "with_vocabulary", "LanguageTask",
           "AutoregressiveDenoiser", "CausalLM", "MaskedDiffusion", "token_embedding"]
