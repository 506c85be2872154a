"""dbjax: DiffusionBlocks (block-wise training of transformers as diffusion denoisers) in JAX.

  dbjax.noise, dbjax.edm   the noise partition, the one sigma -> block map, EDM
  dbjax.config             the experiment config, validated with one-line errors
  dbjax.tasks              the registry of tasks; each task owns its networks, shared state,
                           loss, sampler and evaluation (images, classification, language)
  dbjax.engine             what never asks which task it runs: block states and optimizers,
                           the train step, the sequential and parallel drivers, checkpoints,
                           metric logs, profiling
  dbjax.nets               the networks of one block (DiT, ViT, token transformer)
  dbjax.data               image and text data sets, the step-indexed batch order
  dbjax.sampling           the Euler step and the chain over an embedded target
  dbjax.eval               Frechet distance features and plots (imported where used)
  dbjax.train              train_and_evaluate(config, workdir) and load_run(workdir)
  dbjax.wrap               your own Flax layers as a DiffusionBlocks model
"""
from dbjax import config, edm, engine, errors, noise, sampling, tasks
from dbjax.config import default_config
from dbjax.noise import block_boundaries, block_of_sigma
from dbjax.train import load_run, restore_run, train_and_evaluate
from dbjax.wrap import DiffusionBlocks, wrap

__version__ = "0.1.0"

__all__ = ["config", "edm", "engine", "errors", "noise", "sampling", "tasks",
           "default_config", "block_boundaries", "block_of_sigma", "load_run", "restore_run",
           "train_and_evaluate", "DiffusionBlocks", "wrap"]
