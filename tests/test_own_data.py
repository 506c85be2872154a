"""Your own data: image folders, .npz arrays and autoencoder latents on disk, the VAE that
makes latents, their resumable encoding, and a latent run's decoding and evaluation."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dbjax import data, tasks, train
from dbjax.data import latents, own
from dbjax.errors import ConfigError, ConfigWarning, DataError
from dbjax.nets import autoencoder
from tests.conftest import tiny_config
from tests.test_experiments import ROOT, run_cli

CLASSES = ("cat", "dog", "owl")


def write_folder(root, per_class=6, size=8, colour=False, sizes=None):
  """A folder of PNGs, a subfolder per class; each class a distinct brightness."""
  rng = np.random.default_rng(0)
  for label, name in enumerate(CLASSES):
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      side = sizes[i % len(sizes)] if sizes else size
      pixels = np.clip(60 * label + rng.integers(0, 60, (side, side, 3 if colour else 1)),
                       0, 255).astype(np.uint8)
      Image.fromarray(pixels if colour else pixels[..., 0]).save(root / name / f"{i}.png")
  return root


def test_a_folder_reads_as_classes_named_by_their_subfolders(tmp_path):
  root = write_folder(tmp_path / "pngs", per_class=10)
  train_data = data.load_images(f"folder:{root}", "train")
  test_data = data.load_images(f"folder:{root}", "test")
  assert train_data.class_names == CLASSES and train_data.num_classes == 3
  assert train_data.images.shape == (24, 8, 8, 1) and test_data.images.shape == (6, 8, 8, 1)
  assert train_data.images.dtype == np.float32
  assert -1 <= train_data.images.min() and train_data.images.max() <= 1
  # The split is fixed and disjoint: the 30 files, each in exactly one split.
  both = np.concatenate([train_data.images, test_data.images]).reshape(30, -1)
  assert len(np.unique(both, axis=0)) == 30
  # Brightness follows the label, so the labels went with their files.
  means = [train_data.images[train_data.labels == c].mean() for c in range(3)]
  assert means == sorted(means)


def test_colour_folders_and_resizing(tmp_path):
  colour = data.load_images(f"folder:{write_folder(tmp_path / 'rgb', colour=True)}", "train")
  assert colour.images.shape[1:] == (8, 8, 3)
  mixed = write_folder(tmp_path / "mixed", sizes=(8, 12))
  with pytest.raises(DataError, match=r"images of mixed sizes \[\(8, 8\), \(12, 12\)\].*"
                                      "config.data.resize"):
    data.load_images(f"folder:{mixed}", "train")
  resized = data.load_images(f"folder:{mixed}", "train", resize=16)
  assert resized.images.shape[1:] == (16, 16, 1)


def test_channels_and_size_are_the_whole_folders(tmp_path):
  """One colour image in the train split makes both splits colour (the test split was
  read as grey and evaluation died in JAX); a test split of another size is refused
  in one line when the training split is read; macOS's hidden ._x.png is skipped."""
  root = tmp_path / "split"
  write_folder(root / "train")
  write_folder(root / "test")
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "train" / "cat" / "rgb.png")
  (root / "test" / "dog" / "._0.png").write_bytes(b"AppleDouble, not a png")
  train_data = data.load_images(f"folder:{root}", "train")
  test_data = data.load_images(f"folder:{root}", "test")
  assert train_data.images.shape[1:] == test_data.images.shape[1:] == (8, 8, 3)
  assert len(test_data.labels) == 18
  other = tmp_path / "other"
  write_folder(other / "train")
  write_folder(other / "test", size=12)
  with pytest.raises(DataError, match=r"images of mixed sizes \[\(8, 8\), \(12, 12\)\]"):
    data.load_images(f"folder:{other}", "train")


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
  """64 distinct 16-bit grey levels stay 64 levels (Pillow's convert("L") made them
  {0, 255})."""
  for name in CLASSES:
    os.makedirs(tmp_path / "deep" / name)
    for i in range(4):
      levels = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)
      Image.fromarray(levels).save(tmp_path / "deep" / name / f"{i}.png")
  assert Image.open(tmp_path / "deep" / "cat" / "0.png").mode in own.SIXTEEN_BIT_MODES
  images = data.load_images(f"folder:{tmp_path / 'deep'}", "train").images
  assert len(np.unique(images)) == 64
  expected = np.rint(np.arange(64) * 1040 * 255 / 65535) / 127.5 - 1
  np.testing.assert_allclose(np.unique(images), expected, atol=1e-6)


def test_bad_folders_are_one_line_naming_the_folder(tmp_path):
  with pytest.raises(DataError, match="no such folder"):
    data.load_images(f"folder:{tmp_path / 'nothing'}", "train")
  root = write_folder(tmp_path / "pngs")
  os.makedirs(root / "empty")
  with pytest.raises(DataError, match=f"{root / 'empty'}: an empty class folder"):
    data.load_images(f"folder:{root}", "train")
  os.rmdir(root / "empty")
  (root / "cat" / "broken.png").write_bytes(b"not a png")
  with pytest.raises(DataError, match="broken.png: not an image Pillow can read"):
    data.load_images(f"folder:{root}", "train")
  with pytest.raises(DataError, match="is not one of 'digits', 'fashion_mnist'"):
    data.load_images("pngs", "train")


def test_arrays_read_uint8_or_float_and_refuse_what_they_cannot_use(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
  np.savez(tmp_path / "set.npz", images=pixels, labels=np.arange(20) % 4)
  train_data = data.load_images(f"arrays:{tmp_path / 'set.npz'}", "train")
  assert train_data.images.shape == (16, 8, 8, 3) and train_data.num_classes == 4
  np.testing.assert_allclose(train_data.images.max(), 1.0, atol=0.01)
  np.savez(tmp_path / "split.npz", train_images=pixels / 127.5 - 1, train_labels=np.zeros(20, int),
           test_images=pixels[:4] / 127.5 - 1, test_labels=np.ones(4, int),
           class_names=np.array(["a", "b"]))
  test_data = data.load_images(f"arrays:{tmp_path / 'split.npz'}", "test")
  assert test_data.images.shape == (4, 8, 8, 3) and test_data.class_names == ("a", "b")
  for arrays, message in [
      (dict(images=pixels), "expected 'images' and 'labels'"),
      (dict(images=pixels, labels=np.zeros(19, int)), r"labels of shape \(19,\)"),
      (dict(images=pixels * 1.0, labels=np.zeros(20, int)), r"float images span \[0, 255\]"),
      (dict(images=pixels[:, :, :4], labels=np.zeros(20, int)), "H = W"),
      (dict(images=pixels, labels=-np.ones(20, int)), r"labels span \[-1, -1\]")]:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
      data.load_images(f"arrays:{tmp_path / 'bad.npz'}", "train")
  # Floats in [0, 1]: probably pixels scaled the other way; they load, with a word.
  np.savez(tmp_path / "unit.npz", images=pixels / 255.0, labels=np.zeros(20, int))
  with pytest.warns(ConfigWarning, match=r"float images span \[0, 1\], not \[-1, 1\].*2 x - 1"):
    data.load_images(f"arrays:{tmp_path / 'unit.npz'}", "train")


def test_a_run_learns_its_shape_and_classes_from_the_data(tmp_path):
  config = tiny_config()
  config.data.name = f"folder:{write_folder(tmp_path / 'pngs', size=16, colour=True)}"
  config, run_data = tasks.load_data(config)  # the config says 8x8x1, 10 classes
  assert (config.data.image_size, config.data.channels, config.data.num_classes) == (16, 3, 3)
  assert run_data.train.class_names == CLASSES
  # Where no data is read (profiling), a built-in set's shape is known, whatever the
  # config's shape fields say.
  stale = tiny_config()
  stale.data.name, stale.data.data_dir = "fashion_mnist", str(tmp_path / "no_files_here")
  resolved = tasks.resolve(stale)
  assert (resolved.data.image_size, resolved.data.channels, resolved.data.num_classes) == (
      28, 1, 10)
  config.data.name = "folder:" + str(write_folder(tmp_path / "odd", size=6))
  config.model.patch_size = 4
  with pytest.raises(ConfigError, match="model.patch_size"):  # 4 does not divide 6
    tasks.load_data(config)


@pytest.mark.slow  # five launches of the commands, 60 s; the data path is in the default set
def test_a_folder_trains_samples_and_evaluates_from_the_command_line(tmp_path):
  root = write_folder(tmp_path / "pngs", per_class=12)
  workdir = str(tmp_path / "run")
  small = ["--config.model.num_layers=2", "--config.model.hidden_size=16",
           "--config.model.num_heads=2", "--config.model.frequency_dim=16",
           "--config.train.num_steps=2", "--config.train.batch_size=8",
           "--config.diffusion.num_blocks=2", "--config.sample.num_steps=2",
           "--config.sample.grid_size=3", "--config.eval.num_samples=12",
           "--config.eval.classifier_steps=5", f"--config.eval.cache_dir={tmp_path / 'cache'}"]
  run_cli("experiments.train", "--config=experiments/configs/digits.py",
          f"--config.data.name=folder:{root}", f"--workdir={workdir}", *small)
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert np.isfinite(json.load(f)["frechet_distance"])
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["num_classes"] == 3
  assert train.load_run(workdir).class_names == CLASSES  # which label is which, from Python
  out = str(tmp_path / "grid.png")
  run_cli("experiments.sample", f"--workdir={workdir}", f"--out={out}")
  from dbjax.eval import plots  # pylint: disable=g-import-not-at-top
  plots.save_image_grid(np.zeros((9, 8, 8, 1)), str(tmp_path / "unnamed.png"), rows=3)
  unnamed = Image.open(tmp_path / "unnamed.png").size[0]
  assert Image.open(out).size[0] > unnamed  # the same grid with its rows named by class
  run_cli("experiments.sample", f"--workdir={workdir}", "--class=owl", f"--out={out}")
  assert Image.open(out).size[0] > unnamed
  refused = run_cli("experiments.sample", f"--workdir={workdir}", "--class=eagle",
                    check=False)
  assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].endswith(
      "sample.class_label='eagle': not a class of this run (its classes: cat, dog, owl)")
  result = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_samples=12")
  assert "frechet_distance" in result.stdout


def test_the_grid_holds_one_class_by_name_or_index_or_a_class_per_row():
  config = tiny_config()
  config.data.num_classes, config.sample.grid_size = 3, 3
  grid = lambda label: tasks.images.grid_labels(_with_label(config, label), CLASSES).tolist()
  assert grid("") == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert grid("dog") == grid("1") == [1] * 9
  with pytest.raises(ConfigError, match=r"class_label='3': not a class of this run"):
    grid("3")


def _with_label(config, label):
  config = config.copy_and_resolve_references()
  config.sample.class_label = label
  return config


# ---------------------------------------------------------------------------- latents


def write_latents(directory, train_rows=40, test_rows=8, shape=(4, 4, 2), dtype=np.float32,
                  info=None):
  """A latents directory of random latents (std 2) and labels of 3 classes."""
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  for split, rows in (("train", train_rows), ("test", test_rows)):
    np.save(directory / f"{split}_latents.npy",
            (2 * rng.standard_normal((rows, *shape))).astype(dtype))
    np.save(directory / f"{split}_labels.npy", np.arange(rows) % 3)
  latents.write_info(str(directory), info or {"scale_factor": 0.5, "shape": list(shape),
                                              "source": None, "decoder": None,
                                              "num_classes": 3})
  return directory


def test_latent_rows_read_from_disk_equal_the_array_times_the_scale(tmp_path):
  directory = write_latents(tmp_path / "lat", dtype=np.float16)
  full = np.load(directory / "train_latents.npy").astype(np.float32) * np.float32(0.5)
  loaded = data.load_images(f"latents:{directory}", "train")
  index = np.array([7, 3, 3, 39, 0])
  np.testing.assert_array_equal(loaded.batch(index)[0], full[index])
  np.testing.assert_array_equal(loaded.images[10:13], full[10:13])
  assert loaded.images.shape == (40, 4, 4, 2) and loaded.num_classes == 3


@pytest.mark.parametrize("spoil,message", [
    (lambda d: os.remove(d / "test_labels.npy"), "test_labels.npy: no such file"),
    (lambda d: os.remove(d / "latents.json"), "latents.json: no such file"),
    (lambda d: np.save(d / "train_latents.npy", np.zeros((40, 4, 4, 3), np.float32)),
     r"latents of shape \(4, 4, 3\); latents.json says \(4, 4, 2\)"),
    (lambda d: np.save(d / "train_latents.npy", np.zeros((40, 4, 4, 2), np.int32)),
     "latents of dtype int32"),
    (lambda d: np.save(d / "train_labels.npy", np.arange(40) + 1), r"labels span \[1, 40\]"),
    (lambda d: np.save(d / "train_latents.npy",
                       np.full((40, 4, 4, 2), np.nan, np.float32)), "row 0 holds NaN or inf"),
    (lambda d: open(d / "train_latents.npy", "r+b").truncate(500), "a file cut short"),
])
def test_bad_latents_are_one_line_naming_the_file(tmp_path, spoil, message):
  directory = write_latents(tmp_path / "lat")
  spoil(directory)
  with pytest.raises(DataError, match=message):
    for split in ("train", "test"):
      loaded = data.load_images(f"latents:{directory}", split)
      loaded.batch(np.arange(loaded.num_examples))


def test_a_latent_row_is_checked_when_read_not_when_the_set_is_opened(tmp_path):
  """Opening a split reads its header alone (not every row on every host); a batch
  holding a non-finite row is refused, naming it, and one without it trains."""
  directory = write_latents(tmp_path / "lat")
  rows = np.load(directory / "train_latents.npy")
  rows[5, 0, 0, 0] = np.inf
  np.save(directory / "train_latents.npy", rows)
  loaded = data.load_images(f"latents:{directory}", "train")
  assert loaded.batch(np.array([0, 6, 39]))[0].shape == (3, 4, 4, 2)
  with pytest.raises(DataError, match=r"train_latents.npy: row 5 holds NaN or inf"):
    loaded.batch(np.array([0, 5]))


def _resident_after_reading(directory: str) -> int:
  """Bytes of this process's resident memory, anonymous and file-backed, after reading
  every row of the training latents in batches, as training does (Linux): a reader
  that memory-maps the file would leave RssAnon flat and grow RssFile instead."""
  code = (
      "import sys, numpy as np\n"
      "from dbjax.data import load_images\n"
      "rows = load_images('latents:' + sys.argv[1], 'train').images\n"
      "for start in range(0, len(rows), 512):\n"
      "  rows[np.arange(start, min(start + 512, len(rows)))]\n"
      "status = open('/proc/self/status').read()\n"
      "print(sum(int(l.split()[1]) for l in status.splitlines()\n"
      "          if l.startswith(('RssAnon', 'RssFile'))))\n")
  out = subprocess.run([sys.executable, "-c", code, directory], capture_output=True, text=True,
                       check=True, cwd=ROOT)
  return int(out.stdout.strip()) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_the_resident_set_does_not_grow_with_the_number_of_latents(tmp_path):
  """Reading a set of 120 MB, batch by batch, leaves the process's own memory where a set
  of 4 MB leaves it: rows come from disk, never the array whole (so a set larger than
  the host's memory trains)."""
  small = write_latents(tmp_path / "small", train_rows=4_000, shape=(8, 8, 4))
  large = write_latents(tmp_path / "large", train_rows=120_000, shape=(8, 8, 4))
  assert os.path.getsize(large / "train_latents.npy") > 120e6
  growth = _resident_after_reading(str(large)) - _resident_after_reading(str(small))
  assert growth < 20e6, growth  # a sixth of the larger set; reading it whole would add 115 MB


# ----------------------------------------------------------- the autoencoder, encoding


@pytest.fixture(scope="module")
def digits_autoencoder(tmp_path_factory):
  """A small VAE on digits, its reconstruction error over 100 steps, saved to a
  directory."""
  import jax, optax  # pylint: disable=g-import-not-at-top,multiple-imports
  digits = data.load_images("digits", "train")
  cfg = autoencoder.AutoencoderConfig(channels=1, latent_channels=4, width=16)
  model = autoencoder.Autoencoder(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, images, key):
    (value, metrics), grads = nnx.value_and_grad(autoencoder.loss, has_aux=True)(
        model, images, key, 1e-3)
    optimizer.update(model, grads)
    return metrics["reconstruction_mse"]

  errors = [float(step(model, optimizer, digits.images[data.batch_indices(0, i, 1437, 64)],
                       jax.random.key(i))) for i in range(100)]
  directory = str(tmp_path_factory.mktemp("vae"))
  autoencoder.save(directory, model, cfg, {"data": "digits"})
  return directory, errors


def test_the_autoencoder_learns_and_reloads_as_the_encode_decode_pair(digits_autoencoder):
  directory, errors = digits_autoencoder
  assert np.mean(errors[-10:]) < 0.5 * np.mean(errors[:10])
  images = data.load_images("digits", "test").images[:16]
  codes = autoencoder.encode(images, directory)
  assert codes.shape == (16, 2, 2, 4)  # 4x down
  decoded = autoencoder.decode(codes, directory)
  assert decoded.shape == images.shape
  # The round trip reconstructs: below the error of the mean image (the decoder
  # clips to [-1, 1], so a range check could not fail).
  error = np.mean(np.square(decoded - images))
  assert error < 0.7 * np.mean(np.square(images.mean(0) - images)), error  # 0.51x here
  np.testing.assert_array_equal(autoencoder.encode(images, directory), codes)  # deterministic


def test_an_interrupted_encoding_resumes_bit_identical(digits_autoencoder, tmp_path):
  directory, _ = digits_autoencoder
  images = data.load_images("digits", "train")
  encode = lambda x: autoencoder.encode(x, directory)
  whole = latents.encode_split(encode, images.images, images.labels, str(tmp_path), "train", 64,
                               MADE_BY)
  expected = np.load(whole)

  class Killed(Exception):
    pass

  calls = {"n": 0}
  def dies_at_the_ninth_batch(x):
    calls["n"] += 1
    if calls["n"] == 9:
      raise Killed
    return encode(x)

  resumed = tmp_path / "resumed"
  os.makedirs(resumed)
  with pytest.raises(Killed):
    latents.encode_split(dies_at_the_ninth_batch, images.images, images.labels, str(resumed),
                         "train", 64, MADE_BY)
  assert not (resumed / "train_latents.npy").exists()  # nothing that looks complete
  assert (resumed / ".train_latents.rows_done").read_text() == str(8 * 64)
  seen = []
  path = latents.encode_split(lambda x: seen.append(len(x)) or encode(x), images.images,
                              images.labels, str(resumed), "train", 64, MADE_BY)
  np.testing.assert_array_equal(np.load(path), expected)
  assert len(seen) == -(-1437 // 64) - 8  # only the batches not written before


MADE_BY = {"encoder": "dbjax.nets.autoencoder:encode", "source": "digits"}


def _fake_encoder(factor):
  """A 4x-downsampling 'encoder' whose rows tell which factor made them."""
  return lambda images: factor * images[:, ::4, ::4]


def test_rows_made_by_other_settings_are_refused_or_encoded_again(tmp_path):
  images = data.load_images("digits", "train")
  first_10, first_20 = (images.images[:n] for n in (10, 20))
  a, b = _fake_encoder(1.0), _fake_encoder(2.0)
  made_by_a, made_by_b = ({**MADE_BY, "checkpoint_sha256": h} for h in ("aaa", "bbb"))
  out = str(tmp_path)
  path = latents.encode_split(a, first_10, images.labels[:10], out, "train", 4, made_by_a)
  with pytest.raises(DataError, match=r"train_latents.npy: made by other settings "
                     r"\(checkpoint_sha256 was 'aaa', this run's is 'bbb'\).*--overwrite"):
    latents.encode_split(b, first_10, images.labels[:10], out, "train", 4, made_by_b)
  with pytest.raises(DataError, match=r"rows was 10, this run's is 20"):
    latents.encode_split(a, first_20, images.labels[:20], out, "train", 4, made_by_a)
  latents.encode_split(b, first_10, images.labels[:10], out, "train", 4, made_by_b,
                       overwrite=True)
  np.testing.assert_array_equal(np.load(path), 2 * first_10[:, ::4, ::4])  # all B's now

  class Killed(Exception):
    pass

  def dies_after_one_batch(x, calls=[]):  # pylint: disable=dangerous-default-value
    calls.append(1)
    if len(calls) == 2:
      raise Killed
    return a(x)

  resumed = str(tmp_path / "resumed")
  os.makedirs(resumed)
  with pytest.raises(Killed):
    latents.encode_split(dies_after_one_batch, first_10, images.labels[:10], resumed, "train",
                         4, made_by_a)
  with pytest.raises(DataError, match=r"train_latents.npy.partial: made by other settings"):
    latents.encode_split(b, first_10, images.labels[:10], resumed, "train", 4, made_by_b)
  path = latents.encode_split(b, first_10, images.labels[:10], resumed, "train", 4, made_by_b,
                              overwrite=True)
  np.testing.assert_array_equal(np.load(path), 2 * first_10[:, ::4, ::4])  # not [A x 4, B x 6]
  with pytest.raises(DataError, match=r"the test split of 'digits' holds no images"):
    latents.encode_split(a, first_10[:0], images.labels[:0], out, "test", 4, made_by_a)


def test_a_decoder_whose_weights_changed_is_refused(digits_autoencoder, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / "vae")
  shutil.copytree(digits_autoencoder[0], weights)
  info = {"decoder": "dbjax.nets.autoencoder:decode", "checkpoint": weights,
          "checkpoint_sha256": latents.weights_sha256(weights), "scale_factor": 1.0}
  assert latents.decode(info, np.zeros((2, 2, 2, 4), np.float32)).shape == (2, 8, 8, 1)
  with open(os.path.join(weights, autoencoder.CONFIG_FILE), "a") as f:
    f.write(" ")  # any byte of the checkpoint
  with pytest.raises(DataError, match=r"the decoder's weights changed since these latents "
                     r"were encoded .*--overwrite"):
    latents.decode(info, np.zeros((2, 2, 2, 4), np.float32))


def test_train_autoencoder_refuses_to_replace_a_trained_one(tmp_path):
  (tmp_path / autoencoder.CONFIG_FILE).write_text("{}")
  result = run_cli("experiments.train_autoencoder", "--data=digits", f"--workdir={tmp_path}",
                   check=False)
  assert result.returncode != 0
  assert "holds a trained autoencoder already" in result.stderr.strip().splitlines()[-1]


def test_a_latent_sets_pixels_are_read_as_they_were_encoded(tmp_path):
  folder = write_folder(tmp_path / "mixed", per_class=10, sizes=(8, 12))
  info = {"source": f"folder:{folder}", "resize": 8, "data_dir": "", "decoder": "x:y"}
  with pytest.raises(DataError):  # mixed sizes: read without resize, the folder fails
    data.load_images(f"folder:{folder}", "train")
  trained_on = data.ImageData(np.zeros((4, 2, 2, 4), np.float32), np.zeros(4, np.int32), 3,
                              latents=info)
  name, train_pixels, test_pixels = tasks.images.pixel_data(trained_on, trained_on)
  assert name == f"folder:{folder}"
  assert train_pixels.images.shape[1:] == test_pixels.images.shape[1:] == (8, 8, 1)


@pytest.mark.slow  # three launches of the command, 40 s
def test_killing_encode_latents_at_random_and_rerunning_gives_the_same_bits(
    digits_autoencoder, tmp_path):
  directory, _ = digits_autoencoder
  command = [sys.executable, "-m", "experiments.encode_latents", "--data=digits",
             f"--checkpoint={directory}", "--batch_size=2"]
  subprocess.run(command + [f"--out={tmp_path / 'whole'}"], check=True, cwd=ROOT,
                 capture_output=True)
  killed = subprocess.Popen(command + [f"--out={tmp_path / 'killed'}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Killed at a random row of the 1437 training rows (a random moment that is sure to
  # fall within the encoding: a wait of random seconds could outlast a cached, fast run).
  target = int(np.random.default_rng().integers(2, 1000))
  progress, deadline = tmp_path / "killed" / ".train_latents.rows_done", time.monotonic() + 60
  while not (progress.exists() and int(progress.read_text() or 0) >= target):
    assert time.monotonic() < deadline and killed.poll() is None
    time.sleep(0.002)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "killed" / "latents.json").exists()
  subprocess.run(command + [f"--out={tmp_path / 'killed'}"], check=True, cwd=ROOT,
                 capture_output=True)
  for name in ("train_latents.npy", "test_latents.npy", "train_labels.npy"):
    np.testing.assert_array_equal(np.load(tmp_path / "whole" / name),
                                  np.load(tmp_path / "killed" / name))


@pytest.mark.slow  # three launches of the command at once, 30 s
def test_two_processes_encode_one_set_to_one_processs_bits(digits_autoencoder, tmp_path):
  """encode_latents --process_index=k --process_count=2, the two at once into one --out:
  the set (both splits, latents.json) is the one a single process writes, bit for bit."""
  directory, _ = digits_autoencoder
  command = [sys.executable, "-m", "experiments.encode_latents", "--data=digits",
             f"--checkpoint={directory}", "--batch_size=64", "--dtype=float16"]
  subprocess.run(command + [f"--out={tmp_path / 'one'}"], check=True, cwd=ROOT,
                 capture_output=True)
  both = [subprocess.Popen(command + [f"--out={tmp_path / 'two'}", f"--process_index={k}",
                                      "--process_count=2"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for k in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in both]
  assert [p.returncode for p in both] == [0, 0], outputs
  assert sum("wrote part" in out for out in outputs) <= 1  # the last one wrote the set
  for name in ("train_latents.npy", "test_latents.npy", "train_labels.npy", "test_labels.npy"):
    np.testing.assert_array_equal(np.load(tmp_path / "one" / name),
                                  np.load(tmp_path / "two" / name))
  infos = [json.loads((tmp_path / d / "latents.json").read_text()) for d in ("one", "two")]
  assert infos[0]["scale_factor"] == infos[1]["scale_factor"] and infos[1]["dtype"] == "float16"


def test_a_latent_run_decodes_its_samples_and_scores_them_in_pixels(digits_autoencoder,
                                                                    tmp_path):
  directory, _ = digits_autoencoder
  out = tmp_path / "lat"
  os.makedirs(out)
  paths = {}
  for split in ("train", "test"):
    split_data = data.load_images("digits", split)
    paths[split] = latents.encode_split(lambda x: autoencoder.encode(x, directory),
                                        split_data.images, split_data.labels, str(out), split,
                                        256, MADE_BY)
  scale = latents.unit_variance_scale(paths["train"])
  unscaled = np.load(paths["train"])
  assert abs(np.std(unscaled * scale) - 1) < 1e-3  # unit variance
  latents.write_info(str(out), {"scale_factor": scale, "shape": [2, 2, 4], "source": "digits",
                                "decoder": "dbjax.nets.autoencoder:decode",
                                "checkpoint": directory, "num_classes": 10})
  config = tiny_config(eval__enabled=True)
  config.data.name, config.model.patch_size = f"latents:{out}", 1
  config.diffusion.sigma_data = 1.0
  config.eval.cache_dir = str(tmp_path / "cache")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["frechet_distance_space"] == "pixels of digits, latents decoded"
  assert np.isfinite(results["frechet_distance"])
  # The grid shows the decoded 8x8 digits: 4 x 4 of them, 1-pixel gaps, enlarged 4 times.
  assert Image.open(tmp_path / "run" / "samples.png").size == (140, 140)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_processes_encoding_their_own_ranges_give_one_processs_bits(digits_autoencoder,
                                                                    tmp_path, dtype):
  """Three processes' ranges (here one after another; one killed and resumed) assemble
  into the rows one process writes, bit for bit, when the last part is done; float16
  storage is the float32 rows rounded."""
  directory, _ = digits_autoencoder
  images = data.load_images("digits", "train")
  encode = lambda x: autoencoder.encode(x, directory)
  for name in ("one", "parts", "wide"):
    os.makedirs(tmp_path / name)
  one = latents.encode_split(encode, images.images, images.labels, str(tmp_path / "one"),
                             "train", 64, MADE_BY, dtype=dtype)
  parts = tmp_path / "parts"
  assert [latents.part_rows(1437, 64, k, 3) for k in range(3)] == [(0, 512), (512, 1024),
                                                                    (1024, 1437)]

  class Killed(Exception):
    pass

  def dies_at_the_third_batch(x, calls=[]):  # pylint: disable=dangerous-default-value
    calls.append(1)
    if len(calls) == 3:
      raise Killed
    return encode(x)
  with pytest.raises(Killed):
    latents.encode_split(dies_at_the_third_batch, images.images, images.labels, str(parts),
                         "train", 64, MADE_BY, dtype=dtype, part=(2, 3))
  for k in (2, 0):  # parts 2 (resumed) and 0: the split waits for part 1
    assert latents.encode_split(encode, images.images, images.labels, str(parts), "train",
                                64, MADE_BY, dtype=dtype, part=(k, 3)) is None
  assembled = latents.encode_split(encode, images.images, images.labels, str(parts), "train",
                                   64, MADE_BY, dtype=dtype, part=(1, 3))
  np.testing.assert_array_equal(np.load(assembled), np.load(one))
  assert np.load(assembled).dtype == np.dtype(dtype)
  np.testing.assert_array_equal(np.load(parts / "train_labels.npy"), images.labels)
  assert sorted(os.listdir(parts)) == ["train_labels.npy", "train_latents.made_by.json",
                                       "train_latents.npy"]
  if dtype == "float16":
    wide = latents.encode_split(encode, images.images, images.labels, str(tmp_path / "wide"),
                                "train", 64, MADE_BY)
    np.testing.assert_array_equal(np.load(one), np.load(wide).astype(np.float16))


def test_center_crop_scales_the_shorter_side_and_keeps_the_middle(tmp_path):
  """ADM's and DiT's ImageNet preprocessing: a 40 x 20 image to 8 x 8 is box-halved
  while its shorter side is at least 16, bicubic to a shorter side of 8, then the
  centre; a folder of mixed sizes loads at the crop's side."""
  wide = np.zeros((20, 40), np.uint8)
  wide[:, 10:30] = 255  # a bright middle, dark left and right quarters
  image = own.center_crop(Image.fromarray(wide), 8)
  assert image.size == (8, 8)
  assert np.asarray(image).min() > 200  # only the middle is left
  half = Image.fromarray(wide).resize((20, 10), Image.Resampling.BOX)
  expected = half.resize((16, 8), Image.Resampling.BICUBIC).crop((4, 0, 12, 8))
  np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
  mixed = write_folder(tmp_path / "mixed", sizes=(8, 12))
  loaded = data.load_images(f"folder:{mixed}", "train", resize=6, center_crop=True)
  assert loaded.images.shape[1:] == (6, 6, 1)
  with pytest.raises(DataError, match=r"center_crop=True needs config.data.resize"):
    data.load_images(f"folder:{mixed}", "train", center_crop=True)


def test_an_assembly_lock_of_a_dead_process_is_taken_over(tmp_path):
  """A process killed while assembling leaves its lock; the next one of this host takes
  it over, while a live holder's (or another host's) lock is respected."""
  import socket  # pylint: disable=g-import-not-at-top
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = tmp_path / "lock"
  lock.write_text(f"{socket.gethostname()} {dead.pid}")
  assert latents._take_lock(str(lock))  # pylint: disable=protected-access
  assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
  assert not latents._take_lock(str(lock))  # pylint: disable=protected-access  # held: alive
  lock.write_text(f"another-host {dead.pid}")
  assert not latents._take_lock(str(lock))  # pylint: disable=protected-access
