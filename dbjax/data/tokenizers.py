"""Text <-> token ids, as config data.tokenizer says:

  "characters"          each distinct character of the corpus is one id (dbjax.data.text.
                        Vocabulary); today's behaviour and the default
  "bpe:<size>"          byte-level BPE with <size> ids, trained here on the training split
                        with Hugging Face's `tokenizers` (as GPT-2's: any text round-trips,
                        no unknown characters)
  a path                a tokenizer file the `tokenizers` library reads (tokenizer.json,
                        e.g. one of your own or one saved by a dbjax run)

Both kinds have the same face: .size, .encode(text, what) -> int32 ids, .decode(ids) ->
text, .save_to(workdir) and .kind. A run saves its tokenizer (vocabulary.json or
tokenizer.json), so prompts, samples and test text go through the one it trained with,
and a run resumed with another tokenizer is refused in one line (`check_same`).

Bits per character are total bits over characters, whatever the tokenizer
(`characters_per_token`), so character and subword runs compare.
"""
import os

import numpy as np

from dbjax.errors import ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
CHARACTERS = "characters"
BPE_PREFIX = "bpe:"
# Byte-level BPE starts from the 256 byte symbols: a smaller vocabulary has no merges.
MIN_BPE_SIZE = 257


class Subwords:
  """A Hugging Face `tokenizers.Tokenizer` behind dbjax's tokenizer face."""
  kind = "subwords"

  def __init__(self, tokenizer, spec: str):
    self.tokenizer, self.spec = tokenizer, spec

  @property
  def size(self) -> int:
    """Token ids 0 .. size - 1."""
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str, what: str = "text") -> np.ndarray:
    """Token ids (n,) int32 of `text`."""
    del what  # byte-level: every text has ids
    return np.asarray(self.tokenizer.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    """Token ids -> text."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def save_to(self, workdir: str):
    """<workdir>/tokenizer.json, with the spec it was made from."""
    self.tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))
    with open(os.path.join(workdir, TOKENIZER_FILE + ".spec"), "w", encoding="utf-8") as f:
      f.write(self.spec)


def train_bpe(texts, size: int, spec: str) -> Subwords:
  """Byte-level BPE of `size` ids trained on the strings of `texts` (an iterable:
  streamed, not joined)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return Subwords(tokenizer, spec)


def read_file(path: str, spec: str) -> Subwords:
  """A tokenizer file; DataError naming it when the library cannot read it."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  try:
    return Subwords(Tokenizer.from_file(path), spec)
  except Exception as e:  # pylint: disable=broad-except  # the library raises bare Exception
    raise DataError(f"config.data.tokenizer={spec!r}: {path} is not a tokenizer file the "
                    f"tokenizers library can read ({str(e).splitlines()[0][:200]})") from e


def parse(spec: str) -> tuple[str, int | str | None]:
  """("characters", None), ("bpe", size) or ("file", path) of a data.tokenizer value;
  ConfigError, one line, for anything else."""
  if spec == CHARACTERS:
    return CHARACTERS, None
  if spec.startswith(BPE_PREFIX):
    size = spec[len(BPE_PREFIX):]
    if not size.isdigit() or int(size) < MIN_BPE_SIZE:
      raise ConfigError(f"config.data.tokenizer={spec!r}: the BPE vocabulary size must be "
                        f"an integer >= {MIN_BPE_SIZE} (its 256 byte symbols and at least "
                        "one merge), e.g. 'bpe:2048'")
    return "bpe", int(size)
  path = os.path.expanduser(spec)
  if os.path.isfile(path):
    return "file", path
  raise ConfigError(f"config.data.tokenizer={spec!r} is not 'characters', "
                    "'bpe:<vocabulary size>' or a tokenizer file (no such file)")


def build(spec: str, train_texts, all_text_characters):
  """The tokenizer `spec` names: characters from all_text_characters() (the corpus's,
  both splits, as before), BPE trained on train_texts() (an iterable of strings), or
  read from a file."""
  from dbjax.data.text import Vocabulary  # pylint: disable=g-import-not-at-top
  kind, value = parse(spec)
  if kind == CHARACTERS:
    return Vocabulary.of_text(all_text_characters())
  if kind == "bpe":
    return train_bpe(train_texts(), value, spec)
  return read_file(value, spec)


def saved(workdir: str | None):
  """The tokenizer a run saved in `workdir` (tokenizer.json or vocabulary.json), or
  None."""
  from dbjax.data.text import VOCABULARY_FILE, Vocabulary  # pylint: disable=g-import-not-at-top
  if workdir is None:
    return None
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    spec = path
    if os.path.exists(path + ".spec"):
      with open(path + ".spec", encoding="utf-8") as f:
        spec = f.read()
    return read_file(path, spec)
  if os.path.exists(os.path.join(workdir, VOCABULARY_FILE)):
    return Vocabulary.load(os.path.join(workdir, VOCABULARY_FILE))
  return None


def spec_of(tokenizer) -> str:
  """The data.tokenizer value a tokenizer was made from."""
  return CHARACTERS if tokenizer.kind == CHARACTERS else tokenizer.spec


def check_same(saved_tokenizer, spec: str, workdir: str, made: str = "run"):
  """ConfigError unless config.data.tokenizer `spec` is the one the run (made="run") or
  the token files (made="token files") in `workdir` were made with: their ids mean
  other text under another tokenizer."""
  if saved_tokenizer is None:
    return
  kind, value = parse(spec)
  was = spec_of(saved_tokenizer)
  same = (kind == CHARACTERS and was == CHARACTERS) or (
      kind != CHARACTERS and saved_tokenizer.kind != CHARACTERS and
      (was == spec or (kind == "file" and was == value)))
  if not same:
    where = (f"the run in {workdir} was trained" if made == "run"
             else f"the token files in {workdir} were made")
    raise ConfigError(f"config.data.tokenizer={spec!r}, but {where} with {was!r}: their "
                      f"token ids mean other text; use {was!r}"
                      + (" or another workdir" if made == "run" else ""))


def same_ids(first, second) -> bool:
  """Whether two tokenizers give every text the same ids."""
  if first.kind != second.kind:
    return False
  if first.kind == CHARACTERS:
    return first == second
  return first.tokenizer.to_str() == second.tokenizer.to_str()


def characters_per_token(tokenizer, tokens: np.ndarray) -> float:
  """Characters the rows of `tokens` (N, T) decode to, per token: 1 for characters, so
  bits per character = bits per token / this."""
  tokens = np.asarray(tokens)
  if tokenizer.kind == CHARACTERS or not tokens.size:
    return 1.0
  return sum(len(tokenizer.decode(row)) for row in tokens) / tokens.size


def token_dtype(size: int, requested: str = "auto") -> np.dtype:
  """The dtype a token file stores ids of a `size`-id vocabulary in: uint16 where they
  fit, else uint32; ConfigError where uint16 is requested and they do not fit."""
  fits = size <= 2**16
  if requested == "uint16" and not fits:
    raise ConfigError(f"a vocabulary of {size} ids does not fit uint16 storage (at most "
                      f"{2**16}): use uint32 or 'auto'")
  if requested not in ("auto", "uint16", "uint32"):
    raise ConfigError(f"token dtype {requested!r}: expected 'auto', 'uint16' or 'uint32'")
  return np.dtype(np.uint16 if requested == "uint16" or (requested == "auto" and fits)
                  else np.uint32)


def describe(tokenizer) -> dict:
  """JSON-able: what a tokenizer is, for metrics.json."""
  return {"tokenizer": spec_of(tokenizer), "vocab_size": tokenizer.size}


__all__ = ["Subwords", "build", "parse", "saved", "check_same", "same_ids",
           "characters_per_token",
           "token_dtype", "describe"]
