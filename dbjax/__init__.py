"""dbjax: DiffusionBlocks (block-wise training of transformers as diffusion denoisers) in JAX.

Pieces, each usable on its own:
  dbjax.noise       the noise partition and the one sigma -> block map
  dbjax.edm         EDM preconditioning and loss weighting
  dbjax.dit         a class-conditional DiT with adaLN-Zero layers (Flax NNX)
  dbjax.blocks      one block's state, loss and jittable train step
  dbjax.vit         a ViT classifier with adaLN-Zero layers, the denoiser of a label
  dbjax.classify    classification: label-embedding denoising, the inference chain
  dbjax.lm_net      a token transformer with adaLN-Zero layers, masks and a KV-cache decode
  dbjax.language    autoregressive and masked-diffusion (MD4) LMs: losses, BPC, generation
  dbjax.text        character-level text data sets and the saved vocabulary
  dbjax.sampling    Euler / Heun samplers with classifier-free guidance
  dbjax.train       train_and_evaluate(config, workdir): the whole run
  dbjax.evaluation  Frechet distance in a cached classifier's feature space
  dbjax.data        image data sets and the step-indexed batch order
  dbjax.checkpoint  orbax checkpoints, one item per block
  dbjax.user_layers dbjax.wrap: your own Flax layers as a DiffusionBlocks model
  dbjax.metric_log  train metrics to JSONL, TensorBoard and the console
"""
from dbjax import (blocks, classify, config, data, dit, edm, errors, evaluation, language,
                   lm_net, metric_log, noise, plots, sampling, text, user_layers, vit)
from dbjax.config import default_config
from dbjax.noise import block_boundaries, block_of_sigma
from dbjax.train import train_and_evaluate
from dbjax.user_layers import DiffusionBlocks, wrap

__version__ = "0.1.0"

__all__ = ["blocks", "classify", "config", "data", "dit", "edm", "errors", "evaluation",
           "language", "lm_net", "metric_log", "noise", "plots", "sampling", "text",
           "user_layers", "vit", "default_config", "block_boundaries", "block_of_sigma",
           "train_and_evaluate", "DiffusionBlocks", "wrap"]
