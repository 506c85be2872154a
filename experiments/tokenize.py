r"""Tokenize a text corpus of any size into token files, which a run then trains on with
--config.data.name=tokens:<out> (dbjax.data.token_files).

  python -m experiments.tokenize --data=file:/data/corpus.txt --tokenizer=bpe:4096 \
      --out=/data/corpus_tokens
  python -m experiments.train --config=experiments/configs/shakespeare_ar.py \
      --config.data.name=tokens:/data/corpus_tokens --config.data.tokenizer=bpe:4096 \
      --workdir=runs/corpus

The corpus is read in pieces of about a megabyte that end at newlines, and the ids are
written as they come (uint16 where the vocabulary fits, else uint32), so memory stays
flat whatever its size; a run reads its batches' rows from the files. --tokenizer is
what config.data.tokenizer takes: "characters", "bpe:<size>" (trained here on the
training split, streamed) or a tokenizer file. The split is dbjax.data.text's: the first
90% of a file's characters train. tokens.json is written last.
"""
import os

from absl import flags

from dbjax.data import token_files, tokenizers
from dbjax.errors import ConfigError
from dbjax.progress import progress_bar
from experiments.cli import run

_DATA = flags.DEFINE_string("data", None, "a text data set (config.data.name): 'file:<path>', "
                            "'shakespeare', 'tfds:<name>'")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "config.data.data_dir of --data (tfds)")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 0, "characters read, 0 = all")
_TOKENIZER = flags.DEFINE_string("tokenizer", "characters", "config.data.tokenizer: "
                                 "'characters', 'bpe:<size>' or a tokenizer file")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "uint16", "uint32"], "how ids are stored "
                           "(auto: uint16 where the vocabulary fits)")
_OUT = flags.DEFINE_string("out", None, "the token-file directory")
flags.mark_flags_as_required(["data", "out"])


def main(argv):
  del argv
  tokenizers.parse(_TOKENIZER.value)  # one line for a bad name, before any reading
  if _MAX_CHARS.value < 0:
    raise ConfigError(f"--max_chars={_MAX_CHARS.value}: expected >= 0 (0 = all)")
  source = _DATA.value
  size = os.path.getsize(source[len("file:"):]) if source.startswith("file:") and \
      os.path.isfile(source[len("file:"):]) else None
  with progress_bar(total=size, desc="tokenizing", unit="char", unit_scale=True) as bar:
    info = token_files.write(source, _OUT.value, _TOKENIZER.value, _DATA_DIR.value,
                             _MAX_CHARS.value, _DTYPE.value, bar)
  print(f"wrote {info['tokens']['train']:,} + {info['tokens']['test']:,} tokens "
        f"({info['dtype']}, {info['vocab_size']} ids, {info['tokenizer']}) to {_OUT.value}; "
        f"train on them with --config.data.name=tokens:{_OUT.value} "
        f"--config.data.tokenizer={info['tokenizer']}")


if __name__ == "__main__":
  run(main)
