"""Token files (dbjax.data.token_files): a corpus tokenized by a streaming pass and read by
rows gives the sequences the in-RAM reading gives, and trains to the same parameters."""
import os

import chex
import numpy as np
import pytest

from dbjax import train
from dbjax.data import text, token_files
from dbjax.errors import ConfigError, DataError
from dbjax.tasks import language
from tests.test_experiments import run_cli
from tests.test_language import TEXT, lm_config

CORPUS = (TEXT + "Ünïcödé: naïve café — ✓\n") * 12


@pytest.fixture
def corpus_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(CORPUS, encoding="utf-8")
  return path


def test_file_pieces_stream_the_text_across_multibyte_boundaries(corpus_file, monkeypatch):
  monkeypatch.setattr(token_files, "PIECE_BYTES", 7)  # cuts through 2- and 3-byte characters
  pieces = list(token_files._file_pieces(str(corpus_file)))  # pylint: disable=protected-access
  assert "".join(pieces) == CORPUS and len(pieces) > 50
  assert token_files.count_characters(str(corpus_file)) == len(CORPUS)
  cut = int(text.TRAIN_FRACTION * len(CORPUS))
  split = token_files.split_pieces(f"file:{corpus_file}")
  assert "".join(split["train"]()) == CORPUS[:cut]
  assert "".join(split["test"]()) == CORPUS[cut:]


def test_character_token_files_read_the_sequences_text_reads(corpus_file, tmp_path):
  info = token_files.write(f"file:{corpus_file}", str(tmp_path / "tokens"))
  assert info["dtype"] == "uint16" and info["tokenizer"] == "characters"
  assert sum(info["characters"].values()) == len(CORPUS)
  files = token_files.load(str(tmp_path / "tokens"), 16)
  in_ram = text.load_text(f"file:{corpus_file}", 16)
  for rows, whole in zip(files, in_ram):
    assert rows.vocabulary == whole.vocabulary and rows.num_examples == whole.num_examples
    np.testing.assert_array_equal(np.asarray(rows.tokens), whole.tokens)
    for index in (np.array([3, 0, 3]), np.arange(rows.num_examples)[::-1]):
      np.testing.assert_array_equal(rows.batch(index)[0], whole.batch(index)[0])
    np.testing.assert_array_equal(rows.tokens[2:5], whole.tokens[2:5])


def test_bpe_token_files_decode_to_the_text(corpus_file, tmp_path):
  token_files.write(f"file:{corpus_file}", str(tmp_path / "bpe"), "bpe:300")
  train_rows, _ = token_files.load(str(tmp_path / "bpe"), 1)
  cut = int(text.TRAIN_FRACTION * len(CORPUS))
  assert train_rows.vocabulary.decode(np.asarray(train_rows.tokens)) == CORPUS[:cut]
  assert train_rows.vocabulary.size == 300


@pytest.mark.slow  # two trainings, 27 s; the default set checks the batches are equal
def test_training_on_token_files_equals_training_on_the_file(corpus_file, tmp_path):
  config = lm_config()
  config.data.name, config.data.vocab_size = f"file:{corpus_file}", 0
  config.train.num_steps = 6
  from_file = train.train(config, str(tmp_path / "file"))
  token_files.write(f"file:{corpus_file}", str(tmp_path / "tokens"))
  config.data.name = f"tokens:{tmp_path / 'tokens'}"
  from_tokens = train.train(config, str(tmp_path / "tokens_run"))
  chex.assert_trees_all_equal(from_tokens.states, from_file.states)
  config.data.tokenizer = "bpe:300"
  with pytest.raises(ConfigError, match=r"data.tokenizer='bpe:300', but the token files in "
                                        r".* were made with 'characters'"):
    language.load_data(config)


def test_bad_token_files_are_one_line(corpus_file, tmp_path):
  directory = tmp_path / "tokens"
  with pytest.raises(DataError, match=r"tokens.json: no such file: .* holds no complete "
                                      "token files"):
    token_files.load(str(directory), 16)
  token_files.write(f"file:{corpus_file}", str(directory))
  with open(directory / "train_tokens.bin", "r+b") as f:
    f.truncate(100)
  with pytest.raises(DataError, match=r"train_tokens.bin: 100 bytes, tokens.json says"):
    token_files.load(str(directory), 16)


def test_the_command_tokenizes_and_says_how_to_train(corpus_file, tmp_path):
  out = tmp_path / "out"
  result = run_cli("experiments.tokenize", f"--data=file:{corpus_file}", "--tokenizer=bpe:280",
                   f"--out={out}")
  assert "--config.data.name=tokens:" in result.stdout and "bpe:280" in result.stdout
  assert os.path.exists(out / "tokenizer.json") and os.path.exists(out / "tokens.json")
  refused = run_cli("experiments.tokenize", f"--data=file:{corpus_file}", "--tokenizer=words",
                    f"--out={out}", check=False)
  assert refused.returncode == 2 and "data.tokenizer='words' is not" in refused.stderr
