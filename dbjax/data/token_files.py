"""A corpus of any size as token files: tokenized once by a streaming pass, read by rows.

  <dir>/train_tokens.bin, <dir>/test_tokens.bin   the ids, uint16 (or uint32 for a
                         vocabulary over 65,536 ids), little-endian, one after another
  <dir>/tokens.json      {"dtype", "tokens": {split: ids}, "characters": {split: ...},
                         "source", "tokenizer", "vocab_size"}, written last: the set is
                         complete when it exists
  <dir>/vocabulary.json or tokenizer.json   the tokenizer (dbjax.data.tokenizers)

experiments/tokenize.py writes them; a run trains on them with data.name="tokens:<dir>".
The text is read in pieces that end at newlines (a file a megabyte at a time), so neither
the tokenizing nor the training holds the corpus: a batch reads its rows of seq_len ids
(`TokenRows`, os.pread at each row's offset), and a step's batch is still a pure
function of (seed, step). A file's split is the one dbjax.data.text makes: the first 90%
of its characters are the training split.
"""
import codecs
import json
import os

import numpy as np

from dbjax.data import text, tokenizers
from dbjax.data.rows import FileOffsetRows
from dbjax.errors import DataError

INFO_FILE = "tokens.json"
PIECE_BYTES = 2**20


def _file_pieces(path: str, start: int = 0, stop: int | None = None):
  """The characters start .. stop - 1 of a UTF-8 file, in pieces of about a megabyte
  that end at a newline where one is near (a tokenizer's pieces), never the whole."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  position, carry = 0, ""
  with open(path, "rb") as f:
    while True:
      raw = f.read(PIECE_BYTES)
      try:
        chunk = carry + decoder.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        raise DataError(f"text file {path!r} is not UTF-8 text ({e.reason})") from e
      cut = chunk.rfind("\n") + 1 if raw else len(chunk)
      piece, carry = (chunk[:cut], chunk[cut:]) if cut else ("", chunk)
      lo, hi = max(start - position, 0), len(piece) if stop is None else stop - position
      if hi > lo and lo < len(piece):
        yield piece[lo:min(hi, len(piece))]
      position += len(piece)
      if not raw or (stop is not None and position >= stop):
        return


def count_characters(path: str) -> int:
  """Characters of a UTF-8 file, read a piece at a time."""
  return sum(len(piece) for piece in _file_pieces(path))


def split_pieces(name: str, data_dir: str = "", max_chars: int = 0) -> dict:
  """{split: a function giving that split's text in pieces} of a text data set, as
  dbjax.data.text splits it; a file is streamed, never read whole."""
  if name.startswith("file:"):
    path = name[len("file:"):]
    if not os.path.isfile(path):
      raise DataError(f"text file {path!r} not found (config.data.name='file:<path>')")
    total = count_characters(path)
    total = min(total, max_chars) if max_chars else total
    cut = int(text.TRAIN_FRACTION * total)
    return {"train": lambda: _file_pieces(path, 0, cut),
            "test": lambda: _file_pieces(path, cut, total)}
  train, test = text.corpus(name, data_dir, max_chars)
  return {"train": lambda: text.pieces(train), "test": lambda: text.pieces(test)}


def characters_of(pieces) -> str:
  """The distinct characters of a stream of pieces, sorted (a characters tokenizer)."""
  seen = set()
  for piece in pieces:
    seen.update(piece)
  return "".join(sorted(seen))


def write(name: str, directory: str, tokenizer_spec: str = "characters", data_dir: str = "",
          max_chars: int = 0, dtype: str = "auto", bar=None) -> dict:
  """Tokenize data set `name` into token files in `directory` (see the module
  docstring), streaming; return tokens.json's content."""
  pieces = split_pieces(name, data_dir, max_chars)
  tokenizer = tokenizers.build(
      tokenizer_spec, pieces["train"],
      lambda: characters_of(p for split in ("train", "test") for p in pieces[split]()))
  storage = tokenizers.token_dtype(tokenizer.size, dtype)
  os.makedirs(directory, exist_ok=True)
  info = {"source": name, "tokenizer": tokenizers.spec_of(tokenizer),
          "vocab_size": tokenizer.size, "dtype": storage.name, "tokens": {}, "characters": {}}
  for split in ("train", "test"):
    path = os.path.join(directory, f"{split}_tokens.bin")
    count = characters = 0
    with open(path + ".partial", "wb") as f:
      for piece in pieces[split]():
        ids = tokenizer.encode(piece, f"{name} {split} split").astype(storage)
        f.write(ids.astype(storage.newbyteorder("<")).tobytes())
        count, characters = count + len(ids), characters + len(piece)
        if bar is not None:
          bar.update(len(piece))
    os.replace(path + ".partial", path)
    info["tokens"][split], info["characters"][split] = count, characters
  tokenizer.save_to(directory)
  with open(os.path.join(directory, INFO_FILE + ".partial"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  os.replace(os.path.join(directory, INFO_FILE + ".partial"), os.path.join(directory, INFO_FILE))
  return info


class TokenRows(FileOffsetRows):
  """Sequences of seq_len ids of a token file, read from disk when indexed:
  rows[index] is int32 (len(index), seq_len); the tail shorter than a row is dropped.
  Indexing, slicing and np.asarray are those of every dbjax.data.rows source."""
  ndim = 2
  dtype = np.dtype(np.int32)

  def __init__(self, path: str, file_dtype: str, count: int, seq_len: int):
    self.path = self.where = path
    self.seq_len = seq_len
    self.file_dtype = np.dtype(file_dtype).newbyteorder("<")
    self.row_bytes = seq_len * self.file_dtype.itemsize
    expected = count * self.file_dtype.itemsize
    if not os.path.isfile(path) or os.path.getsize(path) != expected:
      raise DataError(f"{path}: {os.path.getsize(path) if os.path.isfile(path) else 'no'} "
                      f"bytes, {INFO_FILE} says {expected} ({count} ids): tokenize again "
                      "(experiments/tokenize.py)")
    self.shape = (count // seq_len, seq_len)
    if not self.shape[0]:
      raise DataError(f"{path} has {count} tokens, fewer than one sequence of "
                      f"config.language.seq_len={seq_len}")

  @property
  def size(self) -> int:
    """Ids in the whole rows (the tail shorter than a row is not counted)."""
    return self.shape[0] * self.shape[1]

  def _convert(self, stored: np.ndarray, rows: np.ndarray) -> np.ndarray:
    del rows
    return stored.astype(np.int32)


def read_info(directory: str) -> dict:
  """tokens.json of a token-file directory; DataError when it is not complete."""
  path = os.path.join(directory, INFO_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file: {directory} holds no complete token files "
                    "(experiments/tokenize.py writes them; tokens.json comes last)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load(directory: str, seq_len: int):
  """(train, test) TextData of a token-file directory, read by rows, and its tokenizer."""
  info = read_info(directory)
  tokenizer = tokenizers.saved(directory)
  if tokenizer is None:
    raise DataError(f"{directory}: no tokenizer (vocabulary.json or tokenizer.json)")
  return tuple(text.TextData(TokenRows(os.path.join(directory, f"{split}_tokens.bin"),
                                       info["dtype"], info["tokens"][split], seq_len),
                             tokenizer) for split in ("train", "test"))
