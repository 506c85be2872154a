"""The experiment config: the fields every run has, and its task's own sections.

`default_config(task)` is the fields every run has (method, data, model, diffusion,
parallel, train, eval) plus the sections of `task`, which its module declares with their
defaults and checks (`config_sections`, `validate_config`, found through the registry
dbjax.tasks.REGISTRY): a digits run carries no `language.*`. Experiment files in
experiments/configs/ start from it. It is locked: a typo such as
`config.train.num_step = 5` fails at once with the known fields listed, and
ml_collections refuses a value of the wrong type. `validate` then checks ranges and the
relations between fields, and names the field, its value and what is allowed.
"""
import ml_collections

from dbjax import tasks
from dbjax.errors import ConfigError, nearest, require, warn
from dbjax.nets.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from dbjax.noise import PARTITIONS

METHODS = ("diffusion_blocks", "end_to_end")
PARALLEL_MODES = ("none", "blocks")
NONFINITE_POLICIES = ("stop", "skip")
WAITING_BLOCKS = ("pinned_host", "numpy")
MESH_AXES = ("block", "data", "fsdp", "tensor")  # dbjax.engine.mesh.AXES


# Fields that say how a run executes, not what it computes (the same parameters, bit
# for bit, whatever their values): block jobs that differ in them still assemble.
EXECUTION_FIELDS = ("data.cache_bytes", "data.prefetch", "train.async_checkpoints",
                    "train.progress", "train.stream_blocks", "train.waiting_blocks")


def default_config(task: str = "generation") -> ml_collections.ConfigDict:
  """The default run of `task` (default: a DiffusionBlocks DiT, 12 layers, B = 3, on
  digits): the fields every run has, every one commented, and the task's own sections
  (its module's config_sections). ConfigError naming the tasks for an unknown one."""
  c = _common_fields()
  c.task = task
  with c.unlocked():
    for name, section in tasks.config_sections(task).items():
      c[name] = section
  c.lock()
  return c


def with_task(config, task: str) -> ml_collections.ConfigDict:
  """A copy of `config` for `task`: the fields every run has as they are, the sections of
  `task` at its defaults where `config` does not hold them (the language section of a
  language config stays when it becomes a recurrent-depth one), and no other task's."""
  target = default_config(task)
  fields = flatten(target.to_dict())
  target.update_from_flattened_dict({field: value for field, value in
                                     flatten(config.to_dict()).items()
                                     if field in fields and field != "task"})
  return target


def fields_by_task() -> dict:
  """{task: {dotted field: its default}} of every registered task's default config:
  what a command line may set, and which task's config has a field."""
  return {task: flatten(default_config(task).to_dict()) for task in tasks.REGISTRY}


def _common_fields() -> ml_collections.ConfigDict:
  """The fields every run has, whatever its task."""
  c = ml_collections.ConfigDict()
  # "diffusion_blocks": B blocks, each a denoiser over its own noise interval, trained
  # one at a time. "end_to_end": the same layers as one denoiser over all noise levels.
  c.method = "diffusion_blocks"
  # "generation": a DiT denoises images. "classification": a ViT denoises a label
  # embedding given the image (dbjax.tasks.classification); end-to-end is then a plain ViT.
  # "language": a token transformer, autoregressive or masked diffusion
  # (dbjax.tasks.language); end-to-end is a causal LM, or MD4 over all masking levels.
  c.task = "generation"
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      # images: "digits", "fashion_mnist", "tfds:<name>" (mnist, cifar10, ...), your own
      # "folder:<dir>" (a subfolder per class), "arrays:<file.npz>" or "latents:<dir>"
      # (an autoencoder's latents on disk; docs/own_data.md);
      # text: "shakespeare", "file:<path>", "tfds:<name>" (tiny_shakespeare, lm1b, ...)
      name="digits",
      data_dir="",          # fashion_mnist IDX files / tfds data_dir; "" = the default place
      resize=0,             # folder, tfds: resize every image to resize x resize; 0 = as they are
      # With resize: scale the shorter side to resize and crop the centre (ADM's and
      # DiT's ImageNet preprocessing), not stretch.
      center_crop=False,
      # A folder, .npy or tfds image set at most this large as float32 is decoded into
      # RAM once; a larger one is read by rows as batches need them (dbjax.data.rows).
      cache_bytes=512 * 2**20,
      # Training batches read ahead of the step in background threads (grain), so the
      # rows of a set read by rows are decoded while the devices compute; 0 = none;
      # -1 = 2 on accelerators, none on the CPU backend (dbjax.data.prefetch.depth_for).
      prefetch=-1,
      # The images' shape and classes; set from the data when it is read (a config names
      # the data, not its shape), so these matter only where no data is read (profiling).
      image_size=8, channels=1,
      num_classes=10,       # image classes (generation, classification)
      vocab_size=0,         # text: the vocabulary size, 0 = from the text
      # text: "characters", "bpe:<vocabulary size>" (trained here on the training split)
      # or a tokenizer file (dbjax.data.tokenizers)
      tokenizer="characters",
      max_chars=0,          # text: characters read per split, 0 = all
  ))
  c.model = ml_collections.ConfigDict(dict(
      num_layers=12,        # total depth L; each block gets L / num_blocks layers
      hidden_size=64, num_heads=4, mlp_ratio=4.0, patch_size=2, frequency_dim=128,
      remat=False,          # jax.checkpoint each layer: activations of one layer at a time
      # The computation's dtype: "float32", or "bfloat16" (activations and matmuls;
      # parameters, gradients and optimizer state stay float32; dbjax.nets.dit).
      dtype="float32",
      # How the layers attend (dbjax.nets.attention): "auto" takes cuDNN's fused kernel on
      # a GPU in bfloat16 where its masks allow, else "recompute", which recomputes the
      # probabilities in the backward pass; neither keeps a (heads, T, T) matrix per layer.
      # "xla": jax.nn.dot_product_attention's XLA path, which does (to compare with).
      attention="auto",
      label_dropout=0.1,    # labels replaced by the null label, for classifier-free guidance
  ))
  c.diffusion = ml_collections.ConfigDict(dict(
      num_blocks=3,         # B (paper: 3 for DiT image generation)
      partition="equiprobable",  # or "uniform_log" (the paper's ablation)
      overlap_gamma=0.05,   # widen each block's training interval (paper, Sec. 3.3)
      p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
  ))
  c.parallel = ml_collections.ConfigDict(dict(
      # "none": every iteration trains one block drawn at random (paper, Sec. 4), one
      # block on the device at a time. "blocks": every step trains all B blocks at once,
      # each on its own batch, on its own slice of the mesh (parallel.mesh below), with
      # no communication between blocks (dbjax.engine.parallel); train.num_steps such steps.
      mode="none",
      # Steps between averaging learned shared parameters (a joint label or token
      # embedding, shared modules) across blocks, one small all-reduce; 0 = never, which
      # needs them frozen. Must divide train.checkpoint_every.
      shared_sync_every=0,
      # The one mesh of every mode (dbjax.engine.mesh; docs/scaling_out.md): devices per
      # axis, -1 = the devices left over (at most one of data, fsdp, tensor). block:
      # blocks trained at once (-1: the largest divisor of B that fits; 1 in mode
      # "none"); data and fsdp split the batch, and fsdp also shards each block's state;
      # tensor splits the dimensions that `rules` map to it.
      mesh=ml_collections.ConfigDict(dict(block=-1, data=-1, fsdp=1, tensor=1)),
      # Logical axis names on parameters (nnx.with_partitioning) -> mesh axes, as
      # maxtext's logical_axis_rules; a name that is itself a mesh axis maps to it.
      rules=(("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("vocab", "tensor"), ("layers", None)),
      # Leaves without names below this many elements are copied to every device of
      # the block's slice, not sharded (biases, norm scales: a gather would cost more
      # than they weigh; at 256 they are 0.7% of a digits block at fsdp 8).
      min_shard_size=256,
  ))
  c.train = ml_collections.ConfigDict(dict(
      # The budget in end-to-end steps. DiffusionBlocks runs num_steps * B iterations
      # (an iteration updates one block), so both methods spend the same number of
      # layer evaluations and every block gets about num_steps updates (paper, Sec. 4);
      # with parallel.mode="blocks", num_steps steps of all B blocks at once.
      num_steps=600,
      # warmup_steps: updates of one block (its schedule counts only its own updates).
      batch_size=128, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0,
      adam_b1=0.9, adam_b2=0.99, grad_clip=1.0,
      checkpoint_every=200,  # iterations (or parallel steps) between checkpoints
      max_checkpoints=2,     # checkpoints kept on disk, the newest ones
      # Write checkpoints in the background while training goes on (orbax's async
      # checkpointing; the next checkpoint, the run's end and a stop on a signal wait
      # for it). False: each save is on disk before the next step.
      async_checkpoints=True,
      # A NaN or inf in a block's loss or gradients: its update is never applied, and
      # then the run "stop"s (naming step and block, last good checkpoint kept) or
      # "skip"s the step and counts it (train_metrics.jsonl, metrics.json).
      on_nonfinite="stop",
      progress=True,
      # The sequential driver sends the next block to the device while one trains and
      # the last one back (engine.driver.train_interval); False: one at a time, there
      # and back synchronously (the same results, bit for bit).
      stream_blocks=True,
      # Where blocks wait while another trains, when streaming: "pinned_host", the
      # device's page-locked host memory where its backend has that memory kind (copies
      # to and from it are DMA that run beside the steps), else numpy arrays in host
      # memory; "numpy": always numpy. Between checkpoint intervals they are numpy.
      waiting_blocks="pinned_host",
  ))
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True,
      num_samples=1000,      # generated images for the Frechet distance
      classifier_steps=400,  # training steps of the cached feature classifier
      cache_dir="",          # "" = $DBJAX_CACHE or ~/.cache/dbjax
      max_test_examples=0,   # classification: test examples evaluated; 0 = all
  ))
  return c


def check_field(ok: bool, field: str, value, allowed: str):
  """ConfigError "config.<field>=<value> is invalid: <allowed>" unless ok (the task
  modules' validate_config use it too)."""
  require(ok, f"config.{field}", value, allowed)


def check_positive_integers(values, field: str):
  """check_field that a tuple field (chain lengths, iteration counts) is non-empty and
  holds positive integers only."""
  check_field(len(values) > 0 and all(isinstance(n, int) and n >= 1 for n in values),
              field, values, "a non-empty tuple of positive integers")


def check_choices(config, section: str, choices: dict):
  """check_field for each field of config.<section> named in choices {field: allowed}."""
  for field, allowed in choices.items():
    value = config[section][field]
    check_field(value in allowed, f"{section}.{field}", value, f"one of {allowed}")


def warn_if_warmup_outlasts(warmup: tuple[str, int], num_steps: tuple[str, int],
                            stacklevel: int):
  """A ConfigWarning where the warmup is not shorter than the updates each block gets:
  its learning rate never reaches its peak. Each argument is (its name, its value): the
  config's fields, or wrap's arguments."""
  if warmup[1] >= num_steps[1]:
    warn(f"{warmup[0]}={warmup[1]} is not below {num_steps[0]}={num_steps[1]} (the updates "
         "each block gets): the learning rate never reaches its peak", stacklevel=stacklevel)


def _check_fields(config, schema, prefix=""):
  """Every field of `config` must exist in the schema (typos in hand-built configs)."""
  for key in config.keys():
    if key not in schema:
      raise ConfigError(f"config.{prefix}{key} is not a known field{nearest(key, schema.keys())}"
                        f"; known fields of config{'.' + prefix[:-1] if prefix else ''}: "
                        f"{sorted(schema.keys())}")
    if isinstance(schema[key], ml_collections.ConfigDict):
      _check_fields(config[key], schema[key], f"{prefix}{key}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raise ConfigError naming the first bad field; return the config unchanged."""
  check_field(config.task in tasks.REGISTRY, "task", config.task, f"one of {tuple(tasks.REGISTRY)}")
  schema = default_config(config.task)
  missing = sorted(set(schema.keys()) - set(config.keys()))
  if missing:
    raise ConfigError(f"config.task={config.task!r} needs a config.{missing[0]} section, which "
                      f"this config lacks: start it from dbjax.config.default_config("
                      f"{config.task!r}) (or with_task(config, {config.task!r}))")
  _check_fields(config, schema)
  tasks.validate_config(config)  # the task's own sections, and what it asks of the others
  m, d, t, data = config.model, config.diffusion, config.train, config.data
  check_field(config.method in METHODS, "method", config.method, f"one of {METHODS}")
  check_field(config.data.max_chars >= 0, "data.max_chars", config.data.max_chars,
           ">= 0 (0 = all)")
  check_field(isinstance(config.data.resize, int) and config.data.resize >= 0, "data.resize",
           config.data.resize, "an integer >= 0 (0 = refuse images of mixed sizes)")
  check_field(not config.data.center_crop or config.data.resize > 0, "data.center_crop",
              config.data.center_crop, "False unless config.data.resize gives the side to "
              "crop to (256 for ImageNet, as ADM and DiT)")
  check_field(isinstance(config.data.cache_bytes, int) and config.data.cache_bytes >= 0,
              "data.cache_bytes", config.data.cache_bytes,
              "an integer >= 0 (bytes of float32 images held in RAM; 0 = always by rows)")
  check_field(isinstance(config.data.prefetch, int) and config.data.prefetch >= -1,
              "data.prefetch", config.data.prefetch,
              "an integer >= 0 (batches read ahead of the step; 0 = none), or -1 (auto)")
  check_field(config.eval.max_test_examples >= 0, "eval.max_test_examples",
           config.eval.max_test_examples, ">= 0 (0 means the whole test split)")
  for field, value in [("data.image_size", data.image_size), ("data.channels", data.channels),
                       ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_heads", m.num_heads), ("model.patch_size", m.patch_size),
                       ("diffusion.num_blocks", d.num_blocks), ("train.num_steps", t.num_steps),
                       ("train.batch_size", t.batch_size),
                       ("train.checkpoint_every", t.checkpoint_every),
                       ("train.max_checkpoints", t.max_checkpoints),
                       ("eval.num_samples", config.eval.num_samples)]:
    check_field(isinstance(value, int) and value >= 1, field, value, "a positive integer")
  check_field(isinstance(data.num_classes, int) and data.num_classes >= 1, "data.num_classes",
           data.num_classes, "a positive integer (the number of image classes; a text's "
           "vocabulary size is config.data.vocab_size)")
  # Text runs learn their vocabulary size from the data (0 until then).
  check_field(isinstance(data.vocab_size, int) and data.vocab_size >= 0, "data.vocab_size",
           data.vocab_size, "an integer >= 0 (0 = from the text)")
  if config.method == "diffusion_blocks":
    check_field(m.num_layers % d.num_blocks == 0, "diffusion.num_blocks", d.num_blocks,
             f"must divide model.num_layers={m.num_layers} so every block gets the same "
             "number of layers")
  # The 2-D sine-cosine position embedding splits hidden_size into four equal parts.
  check_field(m.hidden_size % 4 == 0 and m.hidden_size % m.num_heads == 0,
           "model.hidden_size", m.hidden_size,
           f"a multiple of 4 and of model.num_heads={m.num_heads}")
  check_field(data.image_size % m.patch_size == 0, "model.patch_size", m.patch_size,
           f"must divide data.image_size={data.image_size}")
  check_field(0.0 <= m.label_dropout < 1.0, "model.label_dropout", m.label_dropout, "in [0, 1)")
  check_field(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype,
           "'float32' or 'bfloat16'")
  check_field(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention", m.attention,
           f"one of {ATTENTION_IMPLEMENTATIONS}")
  check_field(d.partition in PARTITIONS, "diffusion.partition", d.partition, f"one of {PARTITIONS}")
  check_field(0.0 <= d.overlap_gamma < 1.0, "diffusion.overlap_gamma", d.overlap_gamma, "in [0, 1)")
  check_field(0.0 < d.sigma_min < d.sigma_max, "diffusion.sigma_min", d.sigma_min,
           f"positive and below diffusion.sigma_max={d.sigma_max}")
  check_field(d.p_std > 0, "diffusion.p_std", d.p_std, "positive")
  check_field(d.sigma_data > 0, "diffusion.sigma_data", d.sigma_data, "positive")
  check_field(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "positive")
  check_field(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
  check_field(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
  check_field(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "positive")
  check_field(t.waiting_blocks in WAITING_BLOCKS, "train.waiting_blocks", t.waiting_blocks,
           f"one of {', '.join(WAITING_BLOCKS)}")
  check_field(t.on_nonfinite in NONFINITE_POLICIES, "train.on_nonfinite", t.on_nonfinite,
           f"one of {NONFINITE_POLICIES}")
  p = config.parallel
  check_field(p.mode in PARALLEL_MODES, "parallel.mode", p.mode, f"one of {PARALLEL_MODES}")
  check_field(isinstance(p.shared_sync_every, int) and p.shared_sync_every >= 0
           and (p.shared_sync_every == 0 or t.checkpoint_every % p.shared_sync_every == 0),
           "parallel.shared_sync_every", p.shared_sync_every,
           f"an integer >= 0 (0 = never) that divides train.checkpoint_every="
           f"{t.checkpoint_every}, so every checkpoint holds one shared state")
  for axis in MESH_AXES:
    size = p.mesh[axis]
    check_field(isinstance(size, int) and (size >= 1 or size == -1), f"parallel.mesh.{axis}",
             size, "a number of devices >= 1, or -1 for the devices left over")
  check_field(all(len(rule) == 2 and isinstance(rule[0], str)
               and (rule[1] is None or rule[1] in MESH_AXES) for rule in p.rules),
           "parallel.rules", p.rules,
           f"pairs (logical name, mesh axis or None), the axes among {MESH_AXES}")
  check_field(isinstance(p.min_shard_size, int) and p.min_shard_size >= 0,
           "parallel.min_shard_size", p.min_shard_size, "an integer >= 0")
  return config


def variant(base_config, method: str, **overrides) -> ml_collections.ConfigDict:
  """A validated copy of `base_config` trained by `method`, with its data-derived fields
  filled in; overrides as section__field=value, e.g. diffusion__num_blocks=4."""
  config = base_config.copy_and_resolve_references()
  config.method = method
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return tasks.resolve(validate(config))


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """The config of a dict a run saved (checkpoint metadata, config.json), on today's
  schema: a text run saved before data.vocab_size existed kept its vocabulary size in
  data.num_classes."""
  saved = {section: dict(value) if isinstance(value, dict) else value
           for section, value in saved.items()}
  data = saved.get("data", {})
  if saved.get("task") == "language" and "vocab_size" not in data:
    data["vocab_size"], data["num_classes"] = data.get("num_classes", 0), 10
  config = default_config(saved.get("task", "generation"))
  known = flatten(config.to_dict())
  # Runs saved before each task owned its sections hold every task's: only this task's
  # are read. JSON made the config's tuples lists.
  config.update_from_flattened_dict({
      field: tuple(value) if isinstance(value, list) else value
      for field, value in flatten(saved).items() if field in known})
  return config


def field_holder(config, dotted: str):
  """(the ConfigDict holding field `dotted`, the field's own name): config.a.b -> (a, "b")."""
  *sections, name = dotted.split(".")
  holder = config
  for section in sections:
    holder = holder[section]
  return holder, name


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}: a config's (or metrics') dotted fields."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def counter_unit(config) -> str:
  """What a run counts (progress bar, console, checkpoint folders, metric rows): an
  "iteration" updates one block; with parallel.mode="blocks" a "step" updates all B.
  train.num_steps is neither: the budget in end-to-end steps (total_iterations)."""
  return "step" if config.parallel.mode == "blocks" else "iteration"


def num_trained_blocks(config) -> int:
  """Blocks that train separately: B for DiffusionBlocks, 1 for end-to-end."""
  return config.diffusion.num_blocks if config.method == "diffusion_blocks" else 1


def total_iterations(config) -> int:
  """Iterations at the matched budget of layer evaluations (one block per iteration)."""
  return config.train.num_steps * num_trained_blocks(config)


def shared_updates(config) -> int:
  """Updates the shared state (label or token embedding) gets: one per iteration, or,
  with parallel.mode="blocks", one per step to each block's copy of it."""
  return config.train.num_steps if config.parallel.mode == "blocks" else total_iterations(
      config)
