"""Character-level language modelling (paper, App. E): the autoregressive DiffusionBlocks
LM against a causal transformer, and masked diffusion (MD4) as blocks against MD4 end to
end. `build` picks the model from config.language.kind and config.method; `load_data`
reads the text and fills in data.vocab_size. See dbjax.tasks.language.common."""
import os

import numpy as np
from flax import nnx

from dbjax.config import num_trained_blocks, shared_updates
from dbjax.data import text
from dbjax.engine.state import make_optimizer, shared_optimizer
from dbjax.errors import ConfigError
from dbjax.nets.lm import LMConfig, LMNet
from dbjax.tasks.base import RunData, noise_plan
from dbjax.tasks.language.autoregressive import AutoregressiveDenoiser
from dbjax.tasks.language.causal import CausalLM
from dbjax.tasks.language.common import LanguageTask, token_embedding
from dbjax.tasks.language import single_stream
from dbjax.tasks.language.masked import MaskedDiffusion, masking_boundaries


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


def with_vocabulary(config, vocabulary: text.Vocabulary):
  """A copy of config with data.vocab_size = the vocabulary's size."""
  config = config.copy_and_resolve_references()
  config.data.vocab_size = vocabulary.size
  return config


def resolve(config):
  """config with data.vocab_size set: as it is when set, else read from the text."""
  return config if config.data.vocab_size else load_data(config)[0]


def load_data(config, workdir: str | None = None, vocabulary: text.Vocabulary | None = None):
  """(config with data.vocab_size set, RunData of TextData) of the config's text data set
  (dbjax.data.text), encoded with `vocabulary`: default, the one saved in `workdir` by a
  run trained there, else the corpus's own characters."""
  d = config.data
  saved = None if workdir is None else os.path.join(workdir, text.VOCABULARY_FILE)
  if vocabulary is None and saved is not None and os.path.exists(saved):
    vocabulary = text.Vocabulary.load(saved)
  train, test = text.load_text(d.name, config.language.seq_len, d.data_dir, d.max_chars,
                               vocabulary)
  return with_vocabulary(config, train.vocabulary), RunData(train, test)


__all__ = ["build", "load_data", "resolve", "with_vocabulary", "LanguageTask",
           "AutoregressiveDenoiser", "CausalLM", "MaskedDiffusion", "token_embedding"]
