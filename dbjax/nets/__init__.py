"""The networks of one block (Flax NNX), each with the DiT's adaLN-Zero layers:

  dbjax.nets.dit  a class-conditional DiT (image denoiser); the layers all nets share
  dbjax.nets.vit  a ViT classifier that reads a noisy label token
  dbjax.nets.lm   a token transformer with masks and a key-value cache decode
"""
