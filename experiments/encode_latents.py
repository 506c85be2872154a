r"""Encode an image data set into an autoencoder's latents on disk, which a run then trains
on with --config.data.name=latents:<out> (dbjax.data.latents).

  python -m experiments.encode_latents --data=fashion_mnist \
      --encoder=dbjax.nets.autoencoder:encode --checkpoint=runs/vae_fashion_mnist \
      --decoder=dbjax.nets.autoencoder:decode --out=runs/latents_fashion_mnist

--encoder and --decoder name functions "module:function": encoder(images, checkpoint)
takes float32 images (N, H, W, C) in [-1, 1] and gives latents (N, h, w, c); decoder
(latents, checkpoint) gives the images back (for sample grids and a pixel-space Frechet
distance). Batches are encoded on the device with a progress bar and written in chunks:
a killed run, rerun with the same command, resumes where it stopped and gives an array
bit-identical to an uninterrupted one. The scale factor (1 / the training latents'
standard deviation: unit variance, as latent diffusion has it) is computed unless
--scale_factor is given. latents.json is written last: the set is complete when it exists.

The source is read by rows, a batch at a time (dbjax.data.rows), and the latents are
written as they come, so memory stays flat whatever the set's size. ImageNet as ADM and
DiT prepare it is --resize=256 --center_crop; --dtype=float16 halves the disk.
Several processes (or machines sharing --out) encode one set together, each its own
range of rows: --process_index=k --process_count=n, one command each; the last to
finish assembles the split, and the result is bit-identical to one process's:

  for k in 0 1 2 3; do python -m experiments.encode_latents --data=folder:/data/imagenet \
      --resize=256 --center_crop --dtype=float16 --out=/data/latents \
      --process_index=$k --process_count=4 ... & done

Rows already in --out are reused or resumed only when they were made by the same encoder,
the same weights (a SHA-256 of --checkpoint's files), the same data read the same way
and the same row count; otherwise the command stops, naming what differs, unless
--overwrite is given. The weights' hash goes into latents.json too, and sampling or
evaluation refuses a decoder whose weights have changed since.
"""
import os

import numpy as np
from absl import flags

from dbjax.data import latents, load_images
from dbjax.errors import ConfigError
from dbjax.progress import progress_bar
from experiments.cli import run

_DATA = flags.DEFINE_string("data", None, "any image data set dbjax reads (config.data.name)")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "config.data.data_dir of --data")
_RESIZE = flags.DEFINE_integer("resize", 0, "config.data.resize of --data (a folder)")
_ENCODER = flags.DEFINE_string("encoder", "dbjax.nets.autoencoder:encode",
                               "module:function, (images, checkpoint) -> latents")
_DECODER = flags.DEFINE_string("decoder", "dbjax.nets.autoencoder:decode",
                               "module:function, (latents, checkpoint) -> images; 'none' "
                               "for latents with no decoder")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "the argument both functions get: "
                                  "their weights (for dbjax's: a train_autoencoder workdir)")
_OUT = flags.DEFINE_string("out", None, "the latents directory")
_BATCH = flags.DEFINE_integer("batch_size", 256, "images per encoder call")
_SCALE = flags.DEFINE_float("scale_factor", 0.0, "the latents' scale; 0: 1 / their std")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "encode again rows in --out that other "
                               "settings made (else the command stops, naming what differs)")
_CENTER_CROP = flags.DEFINE_bool("center_crop", False, "with --resize: scale the shorter side "
                                 "and crop the centre (ADM's and DiT's ImageNet "
                                 "preprocessing), not stretch")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "how the latents are "
                           "stored (float16: half the disk; read back as float32)")
_PROCESS = flags.DEFINE_integer("process_index", 0, "this process's range of rows, of "
                                "--process_count (run one command per process)")
_PROCESSES = flags.DEFINE_integer("process_count", 1, "processes encoding the set together, "
                                  "each its own range; the last to finish assembles it")
flags.mark_flags_as_required(["data", "out"])


def main(argv):
  del argv
  if _BATCH.value < 1:
    raise ConfigError(f"--batch_size={_BATCH.value}: expected a positive integer")
  if _SCALE.value < 0:
    raise ConfigError(f"--scale_factor={_SCALE.value}: expected > 0, or 0 to compute it")
  if _PROCESSES.value < 1 or not 0 <= _PROCESS.value < _PROCESSES.value:
    raise ConfigError(f"--process_index={_PROCESS.value} --process_count={_PROCESSES.value}: "
                      "expected a count >= 1 and an index in [0, count)")
  if _CENTER_CROP.value and not _RESIZE.value:
    raise ConfigError("--center_crop needs --resize=<side> (256 for ImageNet, as ADM and DiT)")
  encoder = latents.resolve_function(_ENCODER.value, "--encoder")
  decoder = None if _DECODER.value.lower() == "none" else _DECODER.value
  if decoder is not None:
    latents.resolve_function(decoder, "--decoder")
  # By rows whatever the size (cache_bytes 0): each row is read once, a batch at a time.
  splits = {s: load_images(_DATA.value, s, _DATA_DIR.value, _RESIZE.value, cache_bytes=0,
                           center_crop=_CENTER_CROP.value) for s in ("train", "test")}
  if splits["train"].latents is not None:
    raise ConfigError(f"--data={_DATA.value}: holds latents already; give the images")
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint = os.path.abspath(_CHECKPOINT.value) if _CHECKPOINT.value else None
  made_by = {"encoder": _ENCODER.value, "checkpoint": checkpoint,
             "checkpoint_sha256": latents.weights_sha256(checkpoint), "source": _DATA.value,
             "data_dir": _DATA_DIR.value, "resize": _RESIZE.value,
             "center_crop": _CENTER_CROP.value}
  part = (_PROCESS.value, _PROCESSES.value)
  total = sum(last - first for first, last in (
      latents.part_rows(d.num_examples, _BATCH.value, *part) for d in splits.values()))
  with progress_bar(total=total, desc="encoding", unit="image", first_compiles=True) as bar:
    paths = {split: latents.encode_split(lambda x: encoder(x, _CHECKPOINT.value), d.images,
                                         d.labels, _OUT.value, split, _BATCH.value, made_by,
                                         bar, overwrite=_OVERWRITE.value, dtype=_DTYPE.value,
                                         part=part)
             for split, d in splits.items()}
  if any(path is None for path in paths.values()):
    print(f"wrote part {part[0]} of {part[1]} to {_OUT.value}; the process that finishes "
          "the last part assembles the set and writes latents.json")
    return
  shape = list(np.load(paths["train"], mmap_mode="r").shape[1:])
  scale = _SCALE.value or latents.unit_variance_scale(paths["train"])
  train = splits["train"]
  latents.write_info(_OUT.value, {
      **made_by, "scale_factor": scale,
      "scale_rule": "given" if _SCALE.value else "1 / std of the training latents",
      "shape": shape, "decoder": decoder, "dtype": _DTYPE.value,
      "rows": {split: d.num_examples for split, d in splits.items()},
      "num_classes": train.num_classes, "class_names": list(train.class_names)})
  count = sum(d.num_examples for d in splits.values())
  print(f"wrote {count} latents {tuple(shape)} to {_OUT.value} (scale factor {scale:.4g}); "
        f"train on them with --config.data.name=latents:{_OUT.value}")


if __name__ == "__main__":
  run(main)
