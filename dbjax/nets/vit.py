"""A ViT classifier with adaLN-Zero layers, used as the denoiser of a label embedding.

One network serves three roles, chosen by ViTConfig.target_token:
- "class_token": the scaled noisy label embedding c_in z is the first token, in the
  place of ViT's [CLS] token (the authors' released code);
- "concat": a learnable [CLS] token first, the noisy label token beside it (the paper's
  text);
- "none": a plain ViT with a learnable [CLS] token and no label input, the end-to-end
  baseline (its c_noise is a constant, so the adaLN conditioning is a learned bias).
Logits come from the first token through the final adaLN and a zero-initialised
classifier, so a fresh network predicts the uniform distribution. The transformer layers
are the DiT's (dbjax.nets.dit), conditioned on the sigma embedding alone.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dbjax.nets.dit import (DiTConfig, FinalLayer, SigmaEmbedder, apply_layers, compute_dtype,
                           dense, patchify, sincos_position_embedding, stacked_layers)


@dataclasses.dataclass(frozen=True)
class ViTConfig(DiTConfig):
  """A DiT's network fields (num_classes = the classifier's outputs), and where the
  noisy label enters."""
  target_token: str = "class_token"   # or "concat", or "none" (a plain classifier)

  @property
  def has_cls_token(self) -> bool:
    """Whether the network has a learnable [CLS] token (not when the label is it)."""
    return self.target_token != "class_token"


class ViT(nnx.Module):
  """F(c_in z, c_noise, images) -> logits (N, num_classes): the raw network of one block.

  The noisy label z lives in the label-embedding space, which is the model width
  (hidden_size), so c_in z enters as a token without a projection.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dtype = cfg.hidden_size, compute_dtype(cfg)
    self.patch_embed = dense(cfg.patch_size**2 * cfg.channels, d, dtype,
                             names=(None, "embed"), rngs=rngs)
    if cfg.has_cls_token:
      self.cls_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, d)))
    self.sigma_embed = SigmaEmbedder(cfg, rngs=rngs)
    self.layers = stacked_layers(cfg, rngs)
    self.head = FinalLayer(d, cfg.num_classes, dtype, rngs=rngs)

  def __call__(self, images: jax.Array, label_token: jax.Array | None,
               c_noise: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    position = sincos_position_embedding(cfg.hidden_size, cfg.image_size // cfg.patch_size)
    tokens = [(self.patch_embed(patchify(images, cfg.patch_size)) + position).astype(dtype)]
    if label_token is not None:
      tokens.insert(0, label_token[:, None, :].astype(dtype))
    if cfg.has_cls_token:
      tokens.insert(0, jnp.broadcast_to(self.cls_token.value.astype(dtype),
                                        (images.shape[0], 1, cfg.hidden_size)))
    cond = self.sigma_embed(c_noise)
    tokens = apply_layers(self.layers, jnp.concatenate(tokens, axis=1), cond, cfg.remat)
    return self.head(tokens[:, :1], cond)[:, 0]
