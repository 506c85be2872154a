"""Blocks as independent jobs (dbjax.engine.block_jobs): each job's blocks end as in the
sequential run, bit for bit, and the jobs assemble into the sequential run's layout."""
import json
import os
import signal
import subprocess
import time

import chex
import pytest

from dbjax import data, tasks, train
from dbjax.config import default_config
from dbjax.engine import block_jobs
from dbjax.errors import ConfigError, TrainingInterrupted, WorkdirError
from benchmarks import soak
from tests.conftest import tiny_config
from tests.test_classify import classify_config
from tests.test_faults import TINY_OVERRIDES, SignalAtBatch, read_when_stepped


def three_blocks(**overrides):
  """tiny_config with 3 one-layer blocks: 24 iterations, a checkpoint every 6."""
  return tiny_config(**{"model__num_layers": 3, "diffusion__num_blocks": 3,
                        "train__num_steps": 8, "train__checkpoint_every": 6, **overrides})


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


@pytest.fixture(scope="module")
def sequential(digits, tmp_path_factory):
  """The sequential run the block jobs must reproduce."""
  return train.train(three_blocks(), str(tmp_path_factory.mktemp("sequential")), digits)


def assert_same_run(run, expected):
  chex.assert_trees_all_equal(run.states, expected.states)
  chex.assert_trees_all_equal(run.shared, expected.shared)
  assert run.history == sorted(expected.history, key=lambda r: r["step"])


def test_jobs_in_one_workdir_assemble_the_sequential_run(tmp_path, digits, sequential):
  config, workdir = three_blocks(), str(tmp_path)
  first = train.train(config, workdir, digits, blocks="2")
  assert first.blocks == [2] and first.unfinished == {0: None, 1: None} and first.run is None
  # Until every block is at its end, nothing reads the run, and a plain run refuses it.
  for read in (train.load_run, train.restore_run):
    with pytest.raises(WorkdirError, match=r"block 0 \(not started\), block 1 \(not "
                                           r"started\); run their jobs .*--blocks=0,1"):
      read(workdir)
  with pytest.raises(WorkdirError, match="holds block jobs"):
    train.train(config, workdir, digits)
  last = train.train(config, workdir, digits, blocks="0-1")
  assert last.unfinished == {}
  assert_same_run(last.run, sequential)
  # The sequential run's layout, read by every command: one final checkpoint of all.
  assert soak.saved_steps(workdir) == [24]
  loaded = train.load_run(workdir)
  assert loaded.iteration == 24
  chex.assert_trees_all_equal(loaded.states, sequential.states)
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    assert [json.loads(line) for line in f] == last.run.history
  # A finished job run again reads the run back; a plain run finds it complete.
  assert_same_run(train.train(config, workdir, digits, blocks="2").run, sequential)
  assert_same_run(train.train(config, workdir, digits), sequential)


def test_a_stopped_job_resumes_and_jobs_in_separate_workdirs_assemble(tmp_path, digits,
                                                                      sequential):
  config = three_blocks()
  jobs = [str(tmp_path / f"job{b}") for b in range(3)]
  for b in (0, 2):
    train.train(config, jobs[b], digits, blocks=[b])
  # Block 1's job is stopped in the middle of its iterations, and resumed.
  with pytest.raises(TrainingInterrupted, match=r"SIGTERM after saving block 1's checkpoint "
                                                r"at iteration \d+ in"):
    train.train(read_when_stepped(config), jobs[1], SignalAtBatch(digits, 4), blocks="1")
  progress = block_jobs.block_progress(jobs[1], 1)
  assert 0 < progress < 24
  with pytest.raises(WorkdirError, match=f"block 1 \\(at iteration {progress} of 24\\)"):
    train.assemble_run(str(tmp_path / "run"), jobs)
  train.train(config, jobs[1], digits, blocks="1")
  # Another config among the sources is named; then the three assemble.
  other = str(tmp_path / "other")
  os.makedirs(other)
  with open(os.path.join(other, train.CONFIG_FILE), "w") as f:
    f.write(three_blocks(seed=1).to_json())
  with pytest.raises(ConfigError, match=r"differ in config.seed: 0 in .*job0, 1 in .*other"):
    train.assemble_run(str(tmp_path / "run"), [jobs[0], other])
  run = train.assemble_run(str(tmp_path / "run"), jobs)
  assert_same_run(run, sequential)
  chex.assert_trees_all_equal(train.restore_run(str(tmp_path / "run"))[2], sequential.states)


def test_a_frozen_shared_state_is_replayed_bit_for_bit(tmp_path, digits):
  """A classifier with a frozen label embedding: its shared state's optimizer counts
  every iteration of every block, which the assembly replays."""
  config = classify_config(**{"classifier__label_embedding": "frozen",
                              "classifier__shared_modules": "per_block",
                              "train__num_steps": 6})
  expected = train.train(config, str(tmp_path / "sequential"), digits)
  train.train(config, str(tmp_path / "jobs"), digits, blocks="1")
  assembled = train.train(config, str(tmp_path / "jobs"), digits, blocks="0").run
  assert_same_run(assembled, expected)
  assert int(assembled.shared.step) == 12


def test_configs_whose_blocks_cannot_train_apart_are_refused(tmp_path, digits):
  joint = classify_config(**{"classifier__label_embedding": "joint"})
  with pytest.raises(ConfigError, match="share trained parameters.*label_embedding='frozen'"):
    train.train(joint, str(tmp_path / "joint"), digits, blocks="0")
  config = tiny_config()
  config.parallel.mode = "blocks"
  with pytest.raises(ConfigError, match="choose one"):
    train.train(config, str(tmp_path / "parallel"), digits, blocks="0")
  train.train(tiny_config(), str(tmp_path / "plain"), digits)
  with pytest.raises(WorkdirError, match="trained without --blocks"):
    train.train(tiny_config(), str(tmp_path / "plain"), digits, blocks="0")


@pytest.mark.parametrize("text,blocks", [("2", [2]), ("0,2", [0, 2]), ("1-3", [1, 2, 3]),
                                         ("3,0-1", [0, 1, 3]), ([2, 0], [0, 2])])
def test_parse_blocks(text, blocks):
  assert block_jobs.parse_blocks(text, 4) == blocks


@pytest.mark.parametrize("text,message", [("x", "'x' is not a block index"),
                                          ("1-", "'1-' is not"), ("3-1", "'3-1' is not"),
                                          ("4", "block 4 does not "
                                                                       "exist; this run has "
                                                                       "blocks 0 to 3")])
def test_parse_blocks_errors_name_the_value(text, message):
  with pytest.raises(ConfigError, match=f"--blocks={text}: {message}"):
    block_jobs.parse_blocks(text, 4)


def test_a_bad_blocks_value_stops_the_job_before_the_data_load(tmp_path, monkeypatch):
  def load_data(config):
    raise AssertionError("the data was loaded before --blocks was checked")
  monkeypatch.setattr(tasks, "load_data", load_data)
  with pytest.raises(ConfigError, match="--blocks=3: block 3 does not exist"):
    train.train_and_evaluate(default_config(), str(tmp_path), blocks="3")


@pytest.mark.slow  # four CLI launches at once, and a fifth after a kill: about a minute
def test_three_block_jobs_killed_and_restarted_equal_the_sequential_run(tmp_path):
  overrides = [o for o in TINY_OVERRIDES if not o.startswith(("model.num_layers",
                                                              "diffusion.num_blocks"))]
  overrides += ["model.num_layers=3", "diffusion.num_blocks=3", "train.checkpoint_every=15"]
  config_path, workdir = "experiments/configs/digits.py", str(tmp_path / "jobs")
  command = soak.train_command(config_path, workdir, overrides)
  straight = str(tmp_path / "straight")
  reference = subprocess.Popen(soak.train_command(config_path, straight, overrides),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  jobs = {b: subprocess.Popen([*command, f"--blocks={b}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for b in range(3)}
  # Kill block 1's job once it has saved a checkpoint, before it ends.
  while block_jobs.block_progress(workdir, 1) is None and jobs[1].poll() is None:
    time.sleep(0.05)
  jobs[1].send_signal(signal.SIGKILL)
  assert jobs[1].wait() == -signal.SIGKILL
  killed_at = block_jobs.block_progress(workdir, 1)
  assert killed_at < 150
  outputs = {b: jobs[b].communicate(timeout=300) for b in (0, 2)}
  assert all(jobs[b].returncode == 0 for b in (0, 2)), outputs
  restarted = subprocess.run([*command, "--blocks=1"], capture_output=True, text=True,
                             timeout=300)
  assert restarted.returncode == 0, restarted.stderr
  assert f"block 1: resuming from its checkpoint at iteration {killed_at}" in restarted.stdout
  assert reference.wait(timeout=300) == 0
  # Whichever job finished last assembled the run (the restarted one, most likely).
  assert soak.saved_steps(workdir) == [150]
  assert soak.same_parameters(workdir, straight)
