"""All blocks at once, each on its slice of the mesh: the same parameters as one block
after another, no collective across blocks, resume on other device counts, two
processes. Runs on 8 fake CPU devices (tests/fake_devices.py).
"""
import os

from tests import fake_devices

NUM_DEVICES = fake_devices.start(8)

import json  # pylint: disable=wrong-import-position
import re  # pylint: disable=wrong-import-position
import shutil  # pylint: disable=wrong-import-position
import signal  # pylint: disable=wrong-import-position
import socket  # pylint: disable=wrong-import-position
import subprocess  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import chex  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from dbjax import data, engine, tasks, train  # pylint: disable=wrong-import-position
from dbjax.engine import parallel  # pylint: disable=wrong-import-position
from dbjax.engine.file_listings import writer_of  # pylint: disable=wrong-import-position
from benchmarks import hlo  # pylint: disable=wrong-import-position
from dbjax.errors import ConfigError  # pylint: disable=wrong-import-position
from benchmarks.soak import saved_steps  # pylint: disable=wrong-import-position
from tests.conftest import tiny_config  # pylint: disable=wrong-import-position
from tests.two_process_worker import flat_params  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  fake_devices.require(8, NUM_DEVICES)


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


def parallel_config(num_blocks=4, **overrides):
  config = tiny_config(diffusion__num_blocks=num_blocks, **overrides)
  config.parallel.mode = "blocks"
  config.parallel.mesh.data = -1  # the devices each block's slice can have
  return config


def train_in_parallel(config, train_data, devices, num_steps):
  """A BlockParallelTrainer of `config` on `devices` after `num_steps` steps."""
  task = tasks.build(config)
  states, shared = parallel.init_on_host(task, config.seed)
  trainer = parallel.BlockParallelTrainer(task, config, train_data, states, shared, devices)
  trainer.train(np.arange(num_steps))
  return trainer


@pytest.fixture(scope="module")
def one_device_per_block(digits):
  """B = 4 blocks on a 4 x 1 mesh, 3 steps."""
  return train_in_parallel(parallel_config(), digits, jax.devices()[:4], num_steps=3)


@pytest.fixture(scope="module")
def two_devices_per_block(digits):
  """B = 4 blocks on a 4 x 2 mesh, 1 step."""
  return train_in_parallel(parallel_config(), digits, jax.devices(), num_steps=1)


@pytest.fixture(scope="module")
def joint_label_embedding(digits):
  """B = 2 classifier blocks on 2 devices training their label embedding, averaged
  after every step; 4 steps (the zero-initialised head passes the embedding no
  gradient before the third)."""
  config = parallel_config(num_blocks=2, task="classification")
  config.classifier.label_embedding = "joint"
  config.parallel.shared_sync_every = 1
  return train_in_parallel(config, digits, jax.devices()[:2], num_steps=4)


def test_mesh_shape_uses_the_largest_block_group_that_fits():
  assert parallel.mesh_shape(4, 8) == (4, 2)
  assert parallel.mesh_shape(4, 4) == (4, 1)
  assert parallel.mesh_shape(4, 2) == (2, 1)   # two blocks per device
  assert parallel.mesh_shape(4, 1) == (1, 1)
  assert parallel.mesh_shape(3, 8) == (3, 2)   # 6 of 8 devices
  assert parallel.mesh_shape(6, 4) == (3, 1)


def test_parallel_blocks_equal_blocks_trained_one_after_another(one_device_per_block, digits):
  trainer, config = one_device_per_block, one_device_per_block.config
  assert trainer.mesh.devices.shape == (4, 1, 1, 1)
  parallel_states, _ = trainer.host_states()
  # The reference: each block alone on one device, through the same steps, batches
  # and keys.
  step_fn = engine.jit_train_step(trainer.task)
  initial_states, empty = engine.init_on_host(trainer.task, config.seed)
  for b, initial in enumerate(initial_states):
    state = jax.device_put(initial)
    for step in range(3):
      index = data.batch_indices(config.seed, step, digits.num_examples,
                                 config.train.batch_size, block=b)
      state, _, _ = step_fn(state, jax.device_put(empty), digits.batch(index),
                            train.step_key(config.seed, step, b),
                            jnp.asarray(trainer.task.intervals[b]))
    chex.assert_trees_all_close(jax.device_get(state), parallel_states[b], atol=2e-6)
    assert int(parallel_states[b].step) == 3


def test_data_parallel_step_equals_the_whole_batch_on_one_device(two_devices_per_block,
                                                                 digits):
  """A block split over a data axis of 2 takes the step of its whole batch: the noise
  is drawn for the whole batch (not per shard), so the mesh changes nothing but the
  order of float reductions."""
  trainer, config = two_devices_per_block, two_devices_per_block.config
  model = trainer.task
  assert trainer.mesh.devices.shape == (4, 2, 1, 1)
  states, _ = trainer.host_states()
  b = 2
  initial = engine.init_on_host(model, config.seed)[0][b]
  batch = digits.batch(data.batch_indices(config.seed, 0, digits.num_examples,
                                          config.train.batch_size, block=b))
  expected, _, _ = engine.jit_train_step(model)(
      jax.device_put(initial), jax.device_put(engine.init_on_host(model, 0)[1]), batch,
      train.step_key(config.seed, 0, b), jnp.asarray(model.intervals[b]))
  chex.assert_trees_all_close(jax.device_get(states[b].params),
                              jax.device_get(expected.params), atol=2e-6)


def collective_groups(trainer, sync_shared=False) -> list[set[int]]:
  return hlo.collective_groups(trainer.compiled[sync_shared].as_text(), trainer.mesh.size)


def test_compiled_step_has_no_collective_across_blocks(one_device_per_block,
                                                       two_devices_per_block):
  # One device per block: nothing at all to communicate.
  assert collective_groups(one_device_per_block) == []
  # Two devices per block: gradient means, each within one block's data group.
  groups = collective_groups(two_devices_per_block)
  assert groups
  rows = [{2 * b, 2 * b + 1} for b in range(4)]
  assert all(any(group <= row for row in rows) for group in groups), groups


def test_joint_label_embedding_is_averaged_across_blocks(joint_label_embedding):
  """The check above can see a collective across blocks: averaging a trained label
  embedding makes one, and leaves every block's copy equal."""
  trainer = joint_label_embedding
  assert {0, 1} in collective_groups(trainer, sync_shared=True)
  _, shared = trainer.host_states()
  embedding = shared.params["label_embedding"]
  np.testing.assert_allclose(embedding[0], embedding[1], atol=1e-6)
  initial = engine.init_on_host(trainer.task, trainer.config.seed)[1]
  assert not np.allclose(embedding[0], initial.params["label_embedding"])


def test_bad_parallel_settings_are_named(digits):
  def trainer(config):
    return parallel.BlockParallelTrainer(tasks.build(config), config, digits, None, None,
                                         jax.devices())
  with pytest.raises(ConfigError, match="train.batch_size=31"):
    trainer(parallel_config(task="classification", train__batch_size=31))
  config = parallel_config(task="classification")
  config.classifier.label_embedding = "joint"
  with pytest.raises(ConfigError, match="parallel.shared_sync_every=0"):
    trainer(config)


def test_resume_on_fewer_devices_gives_the_same_parameters(tmp_path, digits):
  config = parallel_config(train__num_steps=4, train__checkpoint_every=2)
  whole = train.train(config, str(tmp_path), digits, devices=jax.devices()[:4])
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  resumed = train.train(config, str(tmp_path), digits, devices=jax.devices()[:1])
  chex.assert_trees_all_close(resumed.states, whole.states, atol=2e-6)
  assert [r["step"] for r in resumed.history] == [s for s in range(4) for _ in range(4)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_pair(workdir, *arguments):
  """The two processes of a localhost run of tests/two_process_worker.py, and their logs."""
  worker = os.path.join(os.path.dirname(__file__), "two_process_worker.py")
  address = f"localhost:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=os.path.dirname(os.path.dirname(worker)))
  os.makedirs(workdir, exist_ok=True)
  logs = [os.path.join(workdir, f"process_{i}_{time.monotonic_ns()}.log") for i in range(2)]
  # Output to files, not pipes: a full pipe would stall one process in a collective.
  return [subprocess.Popen([sys.executable, worker, address, str(i), str(workdir),
                            *arguments], env=env, stdout=open(log, "w"),
                           stderr=subprocess.STDOUT) for i, log in enumerate(logs)], logs


@pytest.mark.slow  # three launches of two processes
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  straight, preempted = tmp_path / "straight", tmp_path / "preempted"
  processes, logs = _launch_pair(straight, "once")
  assert [p.wait(timeout=300) for p in processes] == [0, 0]
  processes, logs = _launch_pair(preempted, "once")
  while not os.path.isdir(preempted / "checkpoints" / "20"):
    assert all(p.poll() is None for p in processes), [open(l).read()[-2000:] for l in logs]
    time.sleep(0.05)
  time.sleep(0.3)  # inside the next interval
  processes[1].send_signal(signal.SIGTERM)  # one process only
  assert [p.wait(timeout=300) for p in processes] == [143, 143]
  stops = [re.search(r"stopped by SIGTERM after saving the checkpoint of step (\d+)",
                     open(log).read()) for log in logs]
  assert all(stops) and stops[0].group(1) == stops[1].group(1)  # the same step on both
  assert int(stops[0].group(1)) in saved_steps(preempted)
  processes, logs = _launch_pair(preempted, "once")  # resumed: ends as the straight run
  assert [p.wait(timeout=300) for p in processes] == [0, 0]
  expected, resumed = np.load(straight / "params.npz"), np.load(preempted / "params.npz")
  for name in expected:
    np.testing.assert_array_equal(resumed[name], expected[name])


@pytest.mark.slow  # one launch of two processes, 20 s
def test_each_process_reads_only_the_rows_its_devices_hold(tmp_path):
  """Sequential mode with the batch over data 4 = 2 devices on each of 2 processes: each
  process reads half of every batch, never the whole."""
  processes, logs = _launch_pair(tmp_path, "rows")
  assert [p.wait(timeout=300) for p in processes] == [0, 0], [open(l).read()[-2000:]
                                                              for l in logs]
  for process in (0, 1):
    counted = json.loads((tmp_path / f"rows_{process}.json").read_text())
    # 4 iterations (train.num_steps 2 of each of the 2 blocks), half a batch each.
    assert counted["reads"] == [counted["batch_size"] // 2] * 4, counted


@pytest.mark.slow  # three launches of two processes each, 75 s
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  worker = os.path.join(os.path.dirname(__file__), "two_process_worker.py")
  address = f"localhost:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=os.path.dirname(os.path.dirname(worker)))
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  # Output to files, not pipes: a full pipe would stall one process in a collective.
  processes = [subprocess.Popen([sys.executable, worker, address, str(i), str(tmp_path)],
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
               for i, log in enumerate(logs)]
  for p in processes:
    p.wait(timeout=300)
  assert all(p.returncode == 0 for p in processes), "\n".join(
      log.read_text()[-3000:] for log in logs)
  params = np.load(tmp_path / "params.npz")
  uninterrupted = {k.split("/", 1)[1]: params[k] for k in params if k.startswith("unint")}
  for name, value in uninterrupted.items():
    np.testing.assert_array_equal(params[f"resumed/{name}"], value)
  # Any device count can read it back: here, this process's own.
  _, _, states, _ = train.restore_run(str(tmp_path))
  restored = flat_params(states)
  assert restored.keys() == uninterrupted.keys()
  for name, value in restored.items():
    np.testing.assert_array_equal(value, uninterrupted[name])
  # Each process wrote and listed its own shards, about half of the state's bytes, and
  # nothing gathered: no process wrote the whole state.
  state_bytes = sum(leaf.nbytes for state in states for leaf in jax.tree.leaves(state))
  step_dir = tmp_path / "checkpoints" / str(max(saved_steps(tmp_path)))
  written = {0: 0, 1: 0}
  for path in step_dir.rglob("*"):
    if path.is_file() and "ocdbt.process_" in str(path):
      written[writer_of(str(path.relative_to(step_dir)))] += path.stat().st_size
  for process in (0, 1):
    assert 0.3 * state_bytes < written[process] < 0.7 * state_bytes, (written, state_bytes)
    listing = json.loads((step_dir / f"file_checksums.{process}.json").read_text())
    assert listing and all(writer_of(name) == process for name in listing
                           if "ocdbt.process_" in name)
