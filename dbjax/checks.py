"""Checks of what a user hands the Python API: a wrapped model's init, loss, train_step
and sample (dbjax.wrap), a loaded run's sample (dbjax.load_run) and every task's sample.

Each failure is one DataError line naming the argument, what it got and what is
allowed, in the place of a silent wrong result (a label past the last class is the
guidance's null label, or an embedding row of NaN) or a broadcasting error from deep
inside JAX. Shapes and dtypes are checked always, also while jax.jit traces a function
(at trace time: free). Values (ranges, finiteness) are checked where the array is
concrete, on the host before any compiled step runs; under jit they are not seen, so a
compiled step pays nothing for them.
"""
import jax
import jax.numpy as jnp
import numpy as np

from dbjax.errors import DataError

# Images are scaled to [-1, 1] (EDM's sigma_data = 0.5 assumes that range); a little
# slack for rounding in a user's own scaling.
IMAGE_RANGE = (-1.0, 1.0)
RANGE_SLACK = 1e-3


def concrete(x) -> np.ndarray | None:
  """x as a numpy array, or None while jax traces it (its values are not known yet)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _describe(x) -> str:
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None:
    return f"a {type(x).__name__}"
  return f"shape {tuple(shape)} and dtype {dtype}"


def _array(name: str, x, rank: int, what: str):
  """x as an array (a list made one), DataError unless it is one of rank `rank`."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    try:
      array = np.asarray(x)
    except (TypeError, ValueError):
      array = None
    if array is None or array.dtype == object:
      raise DataError(f"{name}: got {_describe(x)}; expected {what}")
    x = array
  if len(x.shape) != rank:
    raise DataError(f"{name}: got {_describe(x)}; expected {what}")
  return x


def check_images(name: str, images, shape: tuple):
  """DataError unless images are float (N, *shape) scaled to [-1, 1] and finite."""
  height, width, channels = shape
  what = f"float images (N, {height}, {width}, {channels}) scaled to [-1, 1]"
  images = _array(name, images, 4, what)
  if tuple(images.shape[1:]) != tuple(shape):
    raise DataError(f"{name}: got {_describe(images)}; expected {what}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise DataError(f"{name}: got dtype {images.dtype}; expected {what} (pixels in "
                    "[0, 255]: images / 127.5 - 1)")
  values = concrete(images)
  if values is None or values.size == 0:
    return
  if not np.all(np.isfinite(values)):
    raise DataError(f"{name}: contains NaN or inf; expected finite {what}")
  low, high = float(values.min()), float(values.max())
  if low < IMAGE_RANGE[0] - RANGE_SLACK or high > IMAGE_RANGE[1] + RANGE_SLACK:
    hint = " (pixels in [0, 255]? use images / 127.5 - 1)" if high > 2 else ""
    raise DataError(f"{name}: values span [{low:g}, {high:g}]; expected {what}{hint}")


def check_ids(name: str, ids, limit: int, rank: int, what: str, limit_name: str):
  """ids (as an array), DataError unless they are integers of rank `rank` in [0, limit)."""
  ids = _array(name, ids, rank, what)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise DataError(f"{name}: got dtype {ids.dtype}; expected {what}")
  values = concrete(ids)
  if values is not None and values.size and (values.min() < 0 or values.max() >= limit):
    raise DataError(f"{name}: ids span [{values.min()}, {values.max()}]; allowed is "
                    f"[0, {limit}) ({limit_name}={limit})")
  return ids


def check_labels(name: str, labels, num_classes: int):
  """DataError unless labels are integers (N,) in [0, num_classes)."""
  check_ids(name, labels, num_classes, 1, f"integer class labels (N,) in [0, {num_classes})",
            "num_classes")


def check_tokens(name: str, tokens, vocab_size: int, max_length: int):
  """DataError unless tokens are integer ids (N, T) in [0, vocab_size), T <= max_length."""
  what = f"integer token ids (N, T) in [0, {vocab_size}), T <= seq_len={max_length}"
  tokens = check_ids(name, tokens, vocab_size, 2, what, "vocab_size")
  if not 1 <= tokens.shape[1] <= max_length:
    raise DataError(f"{name}: got {_describe(tokens)}; expected {what}")


def check_prompt(prompt_ids, vocab_size: int, seq_len: int, name: str = "prompt") -> np.ndarray:
  """The prompt as int32 ids (P,); DataError unless they are in [0, vocab_size) and
  P < seq_len (at least one token is left to generate)."""
  prompt = _array(name, prompt_ids, 1, f"integer token ids (P,) in [0, {vocab_size})")
  if prompt.shape[0] == 0:  # np.asarray([]) is float: an empty prompt is no ids at all
    return np.zeros((0,), np.int32)
  check_ids(name, prompt, vocab_size, 1, f"integer token ids (P,) in [0, {vocab_size})",
            "vocab_size")
  if prompt.shape[0] >= seq_len:
    raise DataError(f"{name}: {prompt.shape[0]} tokens; it must be shorter than a sequence, "
                    f"seq_len={seq_len}, to leave a token to generate")
  return np.asarray(prompt, np.int32)


def check_batch_sizes(name: str, batch: tuple):
  """DataError unless the batch's arrays agree in their leading size (N)."""
  sizes = [getattr(x, "shape", (None,))[0] for x in batch]
  if len(set(sizes)) > 1:
    raise DataError(f"{name}: its arrays' leading sizes disagree: {sizes}; every array of "
                    "a batch holds the same N examples")


def check_batch(name: str, batch, arity: int, what: str) -> tuple:
  """batch as a tuple of `arity` arrays (a lone array for arity 1 allowed)."""
  if arity == 1 and hasattr(batch, "shape"):
    batch = (batch,)
  if not isinstance(batch, (tuple, list)) or len(batch) != arity:
    raise DataError(f"{name}: got {type(batch).__name__}"
                    + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                    + f"; expected {what}")
  check_batch_sizes(name, tuple(batch))
  return tuple(batch)


def check_key(name: str, key):
  """DataError unless key is a JAX PRNG key: jax.random.key(seed) or the older
  jax.random.PRNGKey(seed)."""
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  raw = dtype == np.uint32 and tuple(getattr(key, "shape", ())) == (2,)
  if not ((typed and key.shape == ()) or raw):
    raise DataError(f"{name}: got {_describe(key) if dtype is not None else repr(key)}; "
                    "expected one PRNG key, jax.random.key(seed)")


def check_count(name: str, value, minimum: int = 1):
  """DataError unless value is an integer >= minimum (a Python or numpy int)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f"{name}={value!r}: expected an integer >= {minimum}")


def check_block(block, num_blocks: int):
  """DataError unless a concrete block index is in [0, num_blocks) (a traced one passes)."""
  value = concrete(block)
  if value is None:
    return
  if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer) or not (
      0 <= int(value) < num_blocks):
    raise DataError(f"block={block!r}: expected an integer block index in [0, {num_blocks})")


def check_sample_call(block_params, num_blocks: int, key, num_steps):
  """DataError unless a sampler gets each block's params, a key and num_steps >= 1 (or
  None: the task's default)."""
  if not isinstance(block_params, (list, tuple)) or len(block_params) != num_blocks:
    count = len(block_params) if isinstance(block_params, (list, tuple)) else "not a list of"
    raise DataError(f"block_params: got {count} blocks' params; expected a list of "
                    f"num_blocks={num_blocks}, block 0's first")
  check_key("key", key)
  if num_steps is not None:
    check_count("num_steps", num_steps)


def check_sampling(temperature: float, top_p: float, num_samples: int, num_steps=None):
  """DataError unless the text sampling settings are in range (num_steps: >= 1, or None
  for the task's default)."""
  check_count("num_samples", num_samples)
  if num_steps is not None:
    check_count("num_steps", num_steps)
  if not temperature >= 0:
    raise DataError(f"temperature={temperature!r}: expected >= 0 (0: greedy)")
  if not 0 < top_p <= 1:
    raise DataError(f"top_p={top_p!r}: expected in (0, 1]")
