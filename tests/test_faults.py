"""Nothing lost: kills and SIGTERM, corrupt checkpoints, a full disk, NaN steps, and
random bad configs and inputs."""
import errno
import os
import signal
import subprocess
import time

import chex
import hypothesis
import hypothesis.strategies as st
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dbjax import config as config_lib, data, tasks, train
from dbjax.data import text
from dbjax.engine.checkpoint import RunCheckpointer
from dbjax.errors import CheckpointError, ConfigError, DataError, TrainingInterrupted
from benchmarks import soak
from tests.conftest import tiny_config
from tests.test_metric_log import read_scalars

# tests/conftest.tiny_config as --config overrides of experiments/configs/digits.py,
# with 100 iterations, so that kills land during training.
TINY_OVERRIDES = ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=2",
                  "model.frequency_dim=32", "diffusion.num_blocks=2",
                  "train.num_steps=50", "train.batch_size=32", "train.warmup_steps=2",
                  "train.checkpoint_every=25", "train.progress=False",
                  "eval.enabled=False", "sample.num_steps=2", "sample.grid_size=2"]


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


@pytest.mark.slow  # four CLI launches, 99 s: a soak, run by README's slow command
def test_killed_and_terminated_run_ends_bit_identical(tmp_path):
  workdir = str(tmp_path / "killed")
  command = soak.train_command("experiments/configs/digits.py", workdir, TINY_OVERRIDES)
  # Seed 3 draws SIGTERM, then SIGKILL; each is sent once the launch has saved a new
  # checkpoint, at a random moment within the next 0.5 s.
  launches = soak.run_with_kills(command, workdir, np.random.default_rng(3), max_kills=2,
                                 seconds=300, sigterm_share=0.5, kill_window=0.5)
  summary = soak.summarize(launches)
  assert [l["signal"] for l in launches] == ["SIGTERM", "SIGKILL", None]
  assert summary["graceful_exit_status_ok"] and summary["graceful_stops_saving_all_applied"] == 1
  assert summary["steps_lost_beyond_last_save"] == 0
  straight = str(tmp_path / "straight")
  soak.reference_run(soak.train_command("experiments/configs/digits.py", straight,
                                        TINY_OVERRIDES))
  assert soak.same_parameters(workdir, straight)


def _largest_file(directory) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(directory)
           for name in names]
  return max(files, key=os.path.getsize)


def read_when_stepped(config):
  """`config` with no batch read ahead (data.prefetch 0): a test that counts batch reads
  as its clock (SignalAtBatch) then reads each batch as its step is dispatched."""
  config.data.prefetch = 0
  return config


class SignalAtBatch:
  """Digits that send this process `signum` while the batch of the k-th iteration run
  is read: a signal arriving in the middle of a train step (with read_when_stepped)."""

  def __init__(self, digits, k: int, signum=signal.SIGTERM):
    self.digits, self.k, self.signum, self.calls = digits, k, signum, 0

  def __getattr__(self, name):  # images, labels, num_examples: the digits'
    return getattr(self.digits, name)

  def batch(self, index):
    self.calls += 1
    if self.calls == self.k:
      os.kill(os.getpid(), self.signum)
    return self.digits.batch(index)


@pytest.mark.parametrize("k", sorted(np.random.default_rng(21).choice(
    np.arange(2, 20), 3, replace=False).tolist()))
def test_a_stop_at_any_moment_saves_within_one_step_and_resumes_exactly(k, tmp_path, digits):
  """SIGTERM inside an interval of 20 iterations (regrouped by block, so no prefix of
  them is done): the checkpoint holds the k iterations applied, per block, and the
  resumed run ends bit-identical to an uninterrupted one."""
  config = read_when_stepped(tiny_config(**{"train__checkpoint_every": 20}))
  _, straight, _, _ = train.train(config, str(tmp_path / "straight"), digits)
  workdir = str(tmp_path / "stopped")
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with pytest.raises(TrainingInterrupted, match=f"SIGTERM after saving the checkpoint of "
                                                f"iteration {k} in"):
    train.train(config, workdir, SignalAtBatch(digits, k))
  assert soak.saved_steps(workdir) == [k]  # no interval end yet: only the stop's save
  _, resumed, _, history = train.train(config, workdir, digits)
  chex.assert_trees_all_equal(resumed, straight)
  assert sorted(r["step"] for r in history) == list(range(20))  # each iteration once
  for b in range(2):  # and once in TensorBoard, the rows of blocks ahead kept
    assert read_scalars(os.path.join(workdir, "tensorboard"))[f"block_{b}/loss"] == [
        (r["step"], pytest.approx(r["loss"])) for r in sorted(history, key=lambda r: r["step"])
        if r["block"] == b]
  # The caller's handlers are back.
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


@pytest.fixture
def ctrl_c_delivered():
  """SIGINT as a terminal delivers it: a test run in the background (CI, xdist
  workers) starts with it ignored, and the driver then leaves it ignored."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_sigint_ignored_at_the_start_stays_ignored(tmp_path, digits):
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:  # a job started in the background: SIGINT is not for it
    run = train.train(read_when_stepped(tiny_config()), str(tmp_path),
                      SignalAtBatch(digits, 5, signal.SIGINT))
  finally:
    signal.signal(signal.SIGINT, previous)
  assert len(run.history) == 20


def test_a_first_ctrl_c_stops_like_sigterm_and_a_second_aborts(tmp_path, digits,
                                                                ctrl_c_delivered):
  config = read_when_stepped(tiny_config(**{"train__checkpoint_every": 20}))
  with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after saving the "
                                                "checkpoint of iteration 5"):
    train.train(config, str(tmp_path / "once"), SignalAtBatch(digits, 5, signal.SIGINT))

  class TwoInterrupts(SignalAtBatch):
    def batch(self, index):
      if self.calls == self.k - 1:  # the first Ctrl-C, then the second one step later
        os.kill(os.getpid(), signal.SIGINT)
      return super().batch(index)
  workdir = str(tmp_path / "twice")
  train.train(tiny_config(**{"train__num_steps": 5}), workdir, digits)  # iterations 0-9
  with pytest.raises(KeyboardInterrupt):
    train.train(config, workdir, TwoInterrupts(digits, 3, signal.SIGINT))
  assert soak.saved_steps(workdir) == [5, 10]  # aborted: the checkpoints before, untouched


@pytest.mark.slow  # three CLI launches
def test_ctrl_c_on_the_command_line_exits_130_with_what_was_applied_saved(tmp_path):
  workdir = str(tmp_path / "run")
  command = soak.train_command("experiments/configs/digits.py", workdir, TINY_OVERRIDES)

  def launch_and_interrupt(ready):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=soak.deliver_sigint)
    while not ready() and process.poll() is None:
      time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err.strip().splitlines()
  # While the init and the step compile (config.json is written just before): no
  # segfault, one line, nothing to save.
  status, err = launch_and_interrupt(lambda: os.path.exists(os.path.join(workdir,
                                                                         "config.json")))
  assert status == 130 and "before any iteration was applied" in err[-1], err
  assert soak.saved_steps(workdir) == []
  # During training: the iterations applied are saved, whatever the interval.
  status, err = launch_and_interrupt(lambda: soak.saved_steps(workdir))
  assert status == 130 and err[-1].startswith("stopped by SIGINT after saving the "
                                              "checkpoint of iteration"), err
  saved = int(err[-1].split("iteration ")[1].split()[0])
  assert soak.saved_steps(workdir)[-1] == saved
  finished = subprocess.run(command, capture_output=True, text=True, check=True)
  assert f"resuming from the checkpoint of iteration {saved}" in finished.stdout


def _flip_a_byte(path: str):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: str):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)


def test_corrupt_checkpoint_is_detected_and_the_one_before_used(tmp_path, digits, capfd):
  config = tiny_config()  # 20 iterations, checkpoints at 5, 10, 15, 20; 2 kept
  workdir = tmp_path / "run"
  _, straight, _, _ = train.train(config, str(workdir), digits)
  # One flipped bit in the newest: the checksum sees it; the run falls back to step 15,
  # moves 20 aside and trains 15 -> 20 again.
  _flip_a_byte(_largest_file(workdir / "checkpoints" / "20" / "block_1"))
  _, resumed, _, history = train.train(config, str(workdir), digits)
  chex.assert_trees_all_equal(resumed, straight)
  assert [r["step"] for r in history] == list(range(20))
  assert os.listdir(tmp_path / "run" / "checkpoints_corrupt")[0].startswith("20_")
  # Both truncated: nothing readable is left, and one clear error names the steps.
  for step in (15, 20):
    _truncate(_largest_file(workdir / "checkpoints" / str(step) / "block_0"))
  with pytest.raises(CheckpointError, match="no readable checkpoint.*checkpoint 20.*checkpoint 15"
                     ".*kept in .*checkpoints_corrupt. Run the same command to start afresh"):
    train.train(config, str(workdir), digits)
  # Caught before orbax reads a byte (its reader, handed a truncated file, printed pages
  # of "Event loop is closed" tracebacks from background threads).
  assert "Traceback" not in capfd.readouterr().err
  # The next run starts afresh, and says so and where the old steps are.
  _, _, _, history = train.train(config, str(workdir), digits)
  assert len(history) == 20
  steps = [s for s, _ in read_scalars(str(workdir / "tensorboard"))["block_0/loss"]]
  assert len(steps) == len(set(steps))  # the old run's curves are gone
  out = capfd.readouterr().out
  assert "starting afresh from iteration 0: no readable checkpoint" in out
  assert "checkpoints_corrupt (" in out and "15_" in out


def test_full_disk_is_reported_and_the_last_checkpoint_kept(tmp_path, digits, monkeypatch):
  config = tiny_config(train__num_steps=5)  # checkpoints at 5 and 10
  workdir = str(tmp_path)
  real_save = ocp.CheckpointManager.save

  def save_until_full(manager, step, *args, **kwargs):
    if step >= 10:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(manager, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
  with pytest.raises(CheckpointError, match="no space left.*checkpoint 10.*checkpoint 5 is kept"):
    train.train(config, workdir, digits)
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert soak.saved_steps(workdir) == [5]
  train.train(config, workdir, digits)  # space again: it resumes
  assert soak.saved_steps(workdir) == [5, 10]


class OneBadExample:
  """Digits whose example 0 overflows the network: batches holding it give NaN."""

  def __init__(self, digits):
    self.images, self.labels = digits.images[:64].copy(), digits.labels[:64]
    self.images[0] = np.float32(1e38)
    self.num_examples = 64

  def batch(self, index):
    return self.images[index], self.labels[index]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, digits):
  config = tiny_config(train__on_nonfinite="skip")
  bad = OneBadExample(digits)
  run = train.train(config, str(tmp_path), bad)
  expected = [0 in data.batch_indices(config.seed, step, 64, config.train.batch_size)
              for step in range(20)]
  assert 0 < sum(expected) < 20
  assert [bool(r["skipped"]) for r in run.history] == expected
  chex.assert_tree_all_finite(run.states)
  for b, state in enumerate(run.states):  # only the finite updates were applied
    applied = sum(not skip for r, skip in zip(run.history, expected) if r["block"] == b)
    counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")  # AdamW's
    assert len(counts) >= 3 and {int(c) for _, c in counts} == {applied}
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the driver's is gone


def test_an_inf_loss_with_finite_gradients_changes_nothing():
  """The guard reads gradients; a loss that overflowed while its gradients did not (an
  inf from squaring a huge but finite error) must be skipped all the same."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dbjax.engine.state import BlockState, guarded  # pylint: disable=g-import-not-at-top
  from dbjax.engine.step import apply_step  # pylint: disable=g-import-not-at-top
  optimizer = guarded(optax.adamw(0.1), 1.0)
  params = {"w": jnp.ones(3)}
  state = BlockState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  grads = {"w": jnp.full(3, 0.5)}
  for loss, moved in ((jnp.float32(np.inf), False), (jnp.float32(2.0), True)):
    new, metrics = apply_step(optimizer, state, grads, loss, {})
    assert bool(metrics["skipped"]) is not moved
    assert bool(jnp.any(new.params["w"] != params["w"])) is moved


def test_a_state_with_nan_is_never_saved(tmp_path):
  checkpointer = RunCheckpointer(str(tmp_path), 1, 2)
  with pytest.raises(FloatingPointError, match="block_0 holds NaN"):
    checkpointer.save(1, [{"w": np.array([1.0, np.nan])}], tiny_config(), {})
  assert checkpointer.latest_step() is None


# ------------------------------------------------------ random configs and inputs

_FIELD_VALUES = {
    "model.num_layers": st.integers(-2, 24), "model.hidden_size": st.integers(-8, 256),
    "model.num_heads": st.integers(-1, 9), "model.patch_size": st.integers(-1, 9),
    "diffusion.num_blocks": st.integers(-1, 13),
    "diffusion.overlap_gamma": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "diffusion.sigma_min": st.floats(-1, 100), "train.batch_size": st.integers(-4, 512),
    "train.learning_rate": st.one_of(st.floats(-1, 1), st.just(float("nan"))),
    "train.checkpoint_every": st.integers(-1, 300),
    "parallel.shared_sync_every": st.integers(-2, 50),
    "data.image_size": st.integers(-1, 64), "language.top_p": st.floats(-1, 2),
    "method": st.sampled_from(["diffusion_blocks", "end_to_end", "backprop"]),
    "task": st.sampled_from(["generation", "classification", "language", "speech"]),
    "train.on_nonfinite": st.sampled_from(["stop", "skip", "ignore"]),
    "train.waiting_blocks": st.sampled_from(["pinned_host", "numpy", "device"]),
    "parallel.mode": st.sampled_from(["none", "blocks", "pipeline"]),
}


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(st.dictionaries(st.sampled_from(sorted(_FIELD_VALUES)),
                                  st.just(None), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: _FIELD_VALUES[k] for k in keys})))
def test_random_configs_are_valid_or_name_a_field(changes):
  task = changes.get("task", "generation")
  config = config_lib.default_config(task if task in tasks.REGISTRY else "generation")
  for dotted, value in changes.items():
    if dotted.partition(".")[0] not in config:
      continue  # another task's section: this task's config does not have it
    *sections, name = dotted.split(".")
    holder = config
    for section in sections:
      holder = holder[section]
    holder[name] = value
  try:
    config_lib.validate(config)
  except ConfigError as e:
    message = str(e)
    assert "\n" not in message and message.startswith("config.")
    assert any(message.startswith(f"config.{field}") for field in
               [*changes, "diffusion.num_blocks", "model.hidden_size", "model.patch_size",
                "parallel.shared_sync_every", "data.image_size"]), message


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.bool_]),
    label_range=st.tuples(st.integers(-3, 12), st.integers(0, 14)),
    poison=st.sampled_from([None, np.nan, np.inf]))
def test_random_images_pass_or_give_one_line(shape, dtype, label_range, poison):
  images = np.zeros(shape, dtype)
  if poison is not None and images.size and np.issubdtype(dtype, np.floating):
    images.flat[0] = poison
  low, span = label_range
  labels = (low + np.arange(shape[0]) % (span + 1)).astype(np.int64)
  try:
    data.check_images(images, labels, image_size=8, channels=1, num_classes=10)
  except DataError as e:
    assert "\n" not in str(e) and str(e).startswith("images")
  else:  # what passes is what training needs
    assert images.shape[1:] == (8, 8, 1) and images.shape[0] > 0
    assert np.issubdtype(images.dtype, np.floating) and np.all(np.isfinite(images))
    assert labels.min() >= 0 and labels.max() < 10


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(raw=st.binary(max_size=64), seq_len=st.integers(1, 8))
def test_random_text_files_load_or_give_one_line(tmp_path_factory, raw, seq_len):
  path = tmp_path_factory.mktemp("text") / "input.txt"
  path.write_bytes(raw)
  try:
    train_data, _ = text.load_text(f"file:{path}", seq_len)
  except DataError as e:
    assert "\n" not in str(e)
  else:
    assert train_data.tokens.shape[1] == seq_len and train_data.num_examples > 0
    assert train_data.vocabulary.decode(train_data.tokens[0]) in raw.decode("utf-8")
