"""One mesh for every mode: its sizes, where each leaf lives, sequential mode on all
devices, and a run that continues on another mesh.

Runs on 8 fake CPU devices (tests/fake_devices.py).
"""
import os

from tests import fake_devices

NUM_DEVICES = fake_devices.start(8)

import importlib.util  # pylint: disable=wrong-import-position
import shutil  # pylint: disable=wrong-import-position

import chex  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

from dbjax import data, tasks, train  # pylint: disable=wrong-import-position
from dbjax.engine import mesh as mesh_lib, parallel  # pylint: disable=wrong-import-position
from dbjax.engine import placement as placement_lib  # pylint: disable=wrong-import-position
from dbjax.engine import state as state_lib  # pylint: disable=wrong-import-position
from dbjax.errors import ConfigError  # pylint: disable=wrong-import-position
from tests.conftest import tiny_config  # pylint: disable=wrong-import-position



@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  fake_devices.require(8, NUM_DEVICES)


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


def sizes(block=-1, data=-1, fsdp=1, tensor=1):
  return dict(block=block, data=data, fsdp=fsdp, tensor=tensor)


def test_sizes_fill_the_devices_and_name_what_does_not_fit():
  assert mesh_lib.resolve_sizes(sizes(), 8, 3, "none") == sizes(1, 8)
  assert mesh_lib.resolve_sizes(sizes(fsdp=4), 8, 3, "none") == sizes(1, 2, 4)
  assert mesh_lib.resolve_sizes(sizes(data=1, fsdp=-1), 8, 3, "none") == sizes(1, 1, 8)
  assert mesh_lib.resolve_sizes(sizes(), 8, 4, "blocks") == sizes(4, 2)
  assert mesh_lib.resolve_sizes(sizes(), 8, 3, "blocks") == sizes(3, 2)  # 2 idle
  assert mesh_lib.resolve_sizes(sizes(fsdp=2), 8, 4, "blocks") == sizes(4, 1, 2)
  assert mesh_lib.resolve_sizes(sizes(1, 3), 8, 3, "none") == sizes(1, 3)  # 5 idle
  with pytest.raises(ConfigError, match=r"parallel.mesh=.* = 12 devices, but 8 are present"):
    mesh_lib.resolve_sizes(sizes(1, 3, 4), 8, 3, "none")
  with pytest.raises(ConfigError, match="at most one of data, fsdp, tensor"):
    mesh_lib.resolve_sizes(sizes(data=-1, fsdp=-1), 8, 3, "none")
  with pytest.raises(ConfigError, match=r"mesh.block=2 is invalid: it must divide.*=3"):
    mesh_lib.resolve_sizes(sizes(block=2), 8, 3, "blocks")
  with pytest.raises(ConfigError, match=r"mesh.block=2 is invalid with parallel.mode='none'"):
    mesh_lib.resolve_sizes(sizes(block=2), 8, 3, "none")


def test_a_run_says_which_devices_it_uses_and_leaves_idle():
  config = tiny_config(diffusion__num_blocks=3)
  config.parallel.mode = "blocks"
  config.parallel.mesh.data = -1
  mesh = parallel.make_mesh(3, jax.devices(), config)
  assert mesh_lib.describe(mesh, 8) == (
      "mesh (block=3, data=2, fsdp=1, tensor=1): 6 of 8 devices used, 2 idle")


class Mesh:  # what leaf_spec reads of a mesh
  def __init__(self, **shape):
    self.shape = shape


def test_leaf_rules():
  mesh = Mesh(block=1, data=2, fsdp=4, tensor=1)
  rules = mesh_lib.Rules({"embed": "fsdp", "layers": None}, 64)
  # No names: fsdp over the largest dimension it divides; small leaves copied.
  assert mesh_lib.leaf_spec((2, 32, 128), None, mesh, rules) == P(None, None, "fsdp")
  assert mesh_lib.leaf_spec((2, 30, 12), None, mesh, rules) == P(None, None, "fsdp")
  assert mesh_lib.leaf_spec((3, 33), None, mesh, rules) == P()   # none divisible
  assert mesh_lib.leaf_spec((32,), None, mesh, rules) == P()     # under 64 elements
  # Names go through the rules, or name an axis themselves; axes of 1 shard nothing.
  assert mesh_lib.leaf_spec((32, 64), ("embed", None), mesh, rules) == P("fsdp", None)
  # Names that leave fsdp unused (tensor of 1 here) are sharded as unnamed leaves,
  # except along a dimension a rule keeps whole.
  assert mesh_lib.leaf_spec((32, 64), (None, "tensor"), mesh, rules) == P(None, "fsdp")
  assert mesh_lib.leaf_spec((64, 32), ("layers", None), mesh, rules) == P(None, "fsdp")
  assert mesh_lib.leaf_spec((64, 30), ("layers", None), mesh, rules) == P()
  assert mesh_lib.leaf_spec((8, 4), (None, "tensor"), mesh, rules) == P()  # small
  with pytest.raises(ConfigError, match=r"leaf \['w'\] of shape \(32, 64\) is annotated "
                                        r"with 1 names \('embed',\): give one per dimension"):
    mesh_lib.leaf_spec((32, 64), ("embed",), mesh, rules, "leaf ['w']")
  with pytest.raises(ConfigError, match=r"axis 'model', which neither config.parallel.rules"):
    mesh_lib.leaf_spec((32, 64), (None, "model"), mesh, rules, "leaf ['w']")
  with pytest.raises(ConfigError, match=r"dimension 'embed' of 30 is not divisible by the "
                                        r"mesh's fsdp axis of 4"):
    mesh_lib.leaf_spec((30, 64), ("embed", None), mesh, rules)


def test_annotated_variables_keep_their_names():
  """A user's nnx.with_partitioning names map through the rules (flax keeps them on the
  variable as out_sharding)."""
  config = tiny_config()
  config.parallel.mesh.update(data=2, fsdp=4)
  mesh = placement_lib.placement_of(tasks.build(config), config).mesh
  layer = nnx.eval_shape(lambda: nnx.Linear(
      64, 32, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                ("embed", None), eager_sharding=False),
      rngs=nnx.Rngs(0)))
  specs = mesh_lib.state_specs(nnx.state(layer), mesh, mesh_lib.Rules.of(config))
  assert specs["kernel"].get_value() == P("fsdp", None)
  assert specs["bias"].get_value() == P()


def load_config(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                         f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["digits", "classify_digits", "shakespeare_ar",
                                  "shakespeare_md4", "shakespeare_recurrent"])
def test_own_networks_name_their_kernels_and_tensor_splits_them(name):
  """Every kernel and table of dbjax's own networks carries logical names (one per
  dimension, the stacked layer axis "layers"), so the rules place it: on a mesh of
  fsdp 2 x tensor 2, "embed" goes over fsdp and "mlp"/"heads" over tensor, and Adam's
  moments follow their parameter. Only leaves under min_shard_size are unnamed."""
  config = load_config(name)
  config.model.update(hidden_size=64, num_heads=4)
  if "data" in config and "vocab_size" in config.data:
    config.data.vocab_size = 66  # what load_data reads of Shakespeare, even for "vocab"
  config.parallel.mesh.update(data=1, fsdp=2, tensor=2)
  task = tasks.build(config)
  placement = placement_lib.placement_of(task, config, jax.devices()[:4])
  block, _ = state_lib.abstract_states(task)
  variables = jax.tree.leaves(block.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for variable in variables:
    names = mesh_lib._names_of(variable)  # pylint: disable=protected-access
    if names is None:
      assert variable.size < config.parallel.min_shard_size, variable
    else:
      assert len(names) == variable.ndim, (variable, names)
      assert set(names) <= set(mesh_lib.Rules.of(config).logical) | {None}, names
  specs = {jax.tree_util.keystr(path): sharding.spec for path, sharding in
           jax.tree_util.tree_leaves_with_path(placement.block)}
  mlp_in = [spec for path, spec in specs.items() if "fc1" in path and "kernel" in path
            and "sigma_embed" not in path]
  # The parameter and Adam's two moments, in every stack of layers.
  assert len(mlp_in) % 3 == 0 and mlp_in
  assert set(mlp_in) == {P(None, "fsdp", "tensor")}
  assert P(None, "fsdp", "tensor") in {spec for path, spec in specs.items() if "qkv" in path}


@pytest.mark.parametrize("name", ["digits", "cifar10"])
@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_a_block_state_is_split_over_fsdp(name, fsdp):
  """Each device holds at most 1/fsdp of a block's parameters and Adam moments, + 2%,
  at the shapes of the digits and cifar10 configs (abstract: nothing allocated)."""
  config = load_config(name)
  config.parallel.mesh.update(data=1, fsdp=fsdp)
  task = tasks.build(config)
  placement = placement_lib.placement_of(task, config, jax.devices()[:fsdp])
  block, _ = state_lib.abstract_states(task)
  whole = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(block))
  per_device = sum(leaf.size * leaf.dtype.itemsize // sharding.num_devices
                   * (sharding.num_devices if "fsdp" not in sharding.spec else 1)
                   for leaf, sharding in zip(jax.tree.leaves(block),
                                             jax.tree.leaves(placement.block)))
  assert per_device <= whole / fsdp * 1.02


def test_blocks_are_born_sharded_where_they_wait():
  """Fresh blocks are made on the mesh (jit with out_shardings), each leaf of
  min_shard_size elements or more over fsdp, and wait in pinned host memory; their
  values are init_on_host's."""
  config = tiny_config(model__hidden_size=64, model__num_heads=4)
  config.parallel.mesh.update(data=2, fsdp=4)
  task = tasks.build(config)
  placement = placement_lib.placement_of(task, config)
  states, _ = placement_lib.born_sharded(task, config.seed, placement)
  for leaf in jax.tree.leaves(states[0]):
    if leaf.size >= config.parallel.min_shard_size and any(d % 4 == 0 for d in leaf.shape):
      assert "fsdp" in leaf.sharding.spec, (leaf.shape, leaf.sharding.spec)
    assert leaf.sharding.memory_kind == "pinned_host"
  chex.assert_trees_all_equal(jax.device_get(states[1]),
                              state_lib.init_on_host(task, config.seed)[0][1])


def test_parallel_mode_shards_each_block_over_its_own_slice(digits):
  config = tiny_config(diffusion__num_blocks=2)
  config.parallel.mode = "blocks"
  config.parallel.mesh.update(data=-1, fsdp=4)
  trainer = parallel.BlockParallelTrainer(tasks.build(config), config, digits)
  assert dict(trainer.mesh.shape) == sizes(2, 1, 4)
  # One block's state over its 4 devices (the tiny test model's biases, copied, weigh
  # 5% more; the real configs' are in test_a_block_state_is_split_over_fsdp).
  whole = sum(leaf.nbytes for leaf in jax.tree.leaves(trainer.states)) / 2
  assert mesh_lib.largest_shard_bytes(trainer.states) <= whole / 4 * 1.1
  for leaf in jax.tree.leaves(trainer.states):
    assert leaf.sharding.spec[0] == "block"
  trainer.train(np.arange(2))
  for leaf in jax.tree.leaves(trainer.states):  # block b's shards on slice b alone
    for shard in leaf.addressable_shards:
      b = shard.index[0].start or 0
      assert shard.data.shape[0] == 1 and shard.device in set(trainer.mesh.devices[b].flat)
  # A checkpoint holds each block spread over all 8 devices, 1/8 on each.
  for state in trainer.host_states()[0]:
    for leaf in jax.tree.leaves(state):
      assert len(leaf.sharding.device_set) == 8
      if leaf.size >= 8 * config.parallel.min_shard_size and any(d % 8 == 0 for d in leaf.shape):
        assert max(s.data.size for s in leaf.addressable_shards) == leaf.size // 8


def test_sequential_on_eight_devices_equals_one_device(tmp_path, digits):
  """The batch over data x fsdp = 2 x 4 and the state over fsdp: the same parameters
  as one device, to float tolerance (the noise is drawn for the whole batch). The run
  then continues on one device from the 8-device checkpoint, each block read onto the
  new mesh."""
  config = tiny_config(train__num_steps=4, train__checkpoint_every=4)
  one = train.train(config, str(tmp_path / "one"), digits, devices=jax.devices()[:1])
  config.parallel.mesh.update(data=2, fsdp=4)
  eight = train.train(config, str(tmp_path / "eight"), digits)
  chex.assert_trees_all_close(eight.states, one.states, atol=1e-5, rtol=1e-5)
  config.train.num_steps = 6
  config.parallel.mesh.update(data=-1, fsdp=1)
  longer_one = train.train(config, str(tmp_path / "one"), digits, devices=jax.devices()[:1])
  resumed = train.train(config, str(tmp_path / "eight"), digits, devices=jax.devices()[:1])
  chex.assert_trees_all_close(resumed.states, longer_one.states, atol=1e-5, rtol=1e-5)


def test_bad_mesh_settings_are_one_line(digits):
  config = tiny_config(train__batch_size=36)
  config.parallel.mesh.update(data=2, fsdp=4)
  with pytest.raises(ConfigError, match=r"train.batch_size=36 is invalid: .* data x fsdp = "
                                        r"2 x 4 = 8 devices; use a multiple of 8"):
    placement_lib.placement_of(tasks.build(config), config)


class ShardedLayer(nnx.Module):
  """A user's layer whose MLP kernels are annotated for a ("data", "model") mesh."""

  def __init__(self, rngs, width=32):
    model = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    self.up = nnx.Linear(width, 4 * width, kernel_init=model, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)
    self.gate = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x, cond):
    return x + self.gate(cond)[:, None] * self.down(nnx.gelu(self.up(x)))


def test_wrap_keeps_a_users_annotations_through_a_step_a_save_and_a_load(tmp_path):
  """Under the user's jax.set_mesh, wrap's step keeps the kernel's and its Adam moments'
  sharding; db.save writes the shards and db.load reads them back onto the mesh with
  the same shardings (it raised on flax's abstract mesh before)."""
  import dbjax  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    db = dbjax.wrap(ShardedLayer, target="image", image_shape=(8, 8, 1), num_layers=4,
                    hidden_size=32, num_blocks=2)
    states = db.init(jax.random.key(0))
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    states[0], _ = jax.jit(db.train_step)(states[0], (images, np.arange(8) % 10),
                                          jax.random.key(1), 0)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(states[0])
               if "up" in jax.tree_util.keystr(path) and leaf.ndim == 3]
    assert len(kernels) == 3  # the parameter and Adam's two moments, stacked by layer
    assert all(k.sharding.spec == P(None, None, "model") for k in kernels)
    db.save(str(tmp_path / "blocks"), states)
    loaded = db.load(str(tmp_path / "blocks"))
  chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(states))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(states)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def test_a_pod_plan_comes_from_the_compiled_sharded_step():
  """plan_pod's rows: end to end and B = 2 on 4 devices over 2 hosts, fsdp 4. A
  device holds a quarter of a block's state (as the shardings say) inside its compiled
  step's bytes; a host holds its two devices' shares of the block that waits."""
  from dbjax.engine import planning  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.parallel.mesh.update(data=1, fsdp=-1)
  rows = planning.pod_plan(config, jax.devices()[:4], 2, [2])
  assert [(r["method"], r["num_blocks"]) for r in rows] == [("end_to_end", 1),
                                                            ("diffusion_blocks", 2)]
  for row in rows:
    assert row["mesh"] == "data=1,fsdp=4,tensor=1"
    assert row["device_state_bytes"] < row["device_bytes"]
    assert row["device_state_bytes"] <= row["block_state_bytes"] / 4 * 1.1
    assert row["host_bytes"] == (row["num_blocks"] - 1) * row["device_state_bytes"] * 2
  assert rows[1]["device_bytes"] < rows[0]["device_bytes"]  # half the layers per block


def test_a_run_continues_on_other_topologies(tmp_path, digits):
  """Checkpoints of an 8-device run (fsdp 8) continued on 2 devices (fsdp 2), then on
  1: each leg reads the last one's checkpoint onto its own mesh, and the run ends at
  the uninterrupted run's parameters to 1e-5; resumed on the same mesh, bit for bit."""
  config = tiny_config(train__num_steps=6, train__checkpoint_every=4,
                       train__max_checkpoints=3)  # iterations 4, 8, 12 (B = 2)
  config.parallel.mesh.update(data=1, fsdp=-1)
  straight = train.train(config, str(tmp_path / "straight"), digits)
  legs, same = tmp_path / "legs", tmp_path / "same"
  shutil.copytree(tmp_path / "straight", legs)
  shutil.copytree(tmp_path / "straight", same)
  for removed, devices in ((("8", "12"), 2), (("12",), 1)):
    for step in removed:
      shutil.rmtree(legs / "checkpoints" / step)
    run = train.train(config, str(legs), digits, devices=jax.devices()[:devices])
  chex.assert_trees_all_close(run.states, straight.states, atol=1e-5, rtol=1e-5)
  shutil.rmtree(same / "checkpoints" / "12")
  again = train.train(config, str(same), digits)
  chex.assert_trees_all_equal(again.states, straight.states)
