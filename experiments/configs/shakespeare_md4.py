"""Masked-diffusion (MD4) DiffusionBlocks LM (12 layers, B=3) on Shakespeare's plays.

Block b owns masking levels t in [1 - (b+1)/B, 1 - b/B] of MD4's linear schedule and
trains the MD4 ELBO restricted to them; sampling unmasks from t = 1 to 0, each step by
the block that owns its t. End-to-end baseline: MD4 over all t with the same 12
layers, --config.method=end_to_end.

  python -m experiments.compare --config=experiments/configs/shakespeare_md4.py \
      --workdir=runs/compare_md4

On a 2-core CPU: 184 s for DiffusionBlocks, 173 s end to end; test ELBO bits per
character 3.678 against 4.178 (0.88x; results/compare_shakespeare_md4.json).
"""
from experiments.configs import shakespeare_ar


def get_config():
  config = shakespeare_ar.get_config()
  config.diffusion.num_blocks = 3      # paper, task table: MD4, 12 layers, B=3
  config.language.kind = "masked"
  return config
