"""Tokenizers (dbjax.data.tokenizers): characters or BPE trained here or read from a file,
saved with a run; bits per character over characters whatever the tokenizer; every
language task trains on subwords."""
import json
import os

import numpy as np
import pytest

import dbjax
from dbjax.data import text, tokenizers
from dbjax.errors import ConfigError, DataError
from dbjax.tasks import language
from tests.test_language import TEXT, lm_config
from tests.test_recurrent import recurrent_config

CORPUS = TEXT * 8 + "Ünïcödé, naïve café — ✓\n"


@pytest.fixture
def corpus_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(CORPUS, encoding="utf-8")
  return path


def test_bpe_trained_here_round_trips_any_text():
  bpe = tokenizers.build("bpe:300", lambda: text.pieces(CORPUS, 100), lambda: CORPUS)
  assert bpe.size == 300 and bpe.kind == "subwords"
  ids = bpe.encode(CORPUS)
  assert ids.dtype == np.int32 and len(ids) < 0.7 * len(CORPUS)  # merges shorten it
  assert bpe.decode(ids) == CORPUS
  unseen = "Zebras quoth: «¿qué?» 🦓"  # characters the corpus never had
  assert bpe.decode(bpe.encode(unseen)) == unseen
  # The characters the rows decode to, per token: the whole text's, up to its tail.
  rows = ids[: len(ids) // 4 * 4].reshape(4, -1)
  assert tokenizers.characters_per_token(bpe, rows) == pytest.approx(
      len(CORPUS) / len(ids), rel=1e-3)


def test_text_pieces_end_at_newlines_and_join_to_the_text():
  parts = list(text.pieces(CORPUS, 50))
  assert "".join(parts) == CORPUS and len(parts) > 5
  assert all(p.endswith("\n") for p in parts[:-1])


def test_bad_tokenizers_are_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"data.tokenizer='words' is not 'characters', "
                                        r"'bpe:<vocabulary size>' or a tokenizer file"):
    tokenizers.parse("words")
  with pytest.raises(ConfigError, match=r"'bpe:100': the BPE vocabulary size must be an "
                                        r"integer >= 257"):
    tokenizers.parse("bpe:100")
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not a tokenizer")
  with pytest.raises(DataError, match=r"tokenizer.json is not a tokenizer file the "
                                      r"tokenizers library can read"):
    tokenizers.build(str(bad), lambda: [], lambda: "")
  with pytest.raises(ConfigError, match=r"a vocabulary of 70000 ids does not fit uint16"):
    tokenizers.token_dtype(70000, "uint16")
  assert tokenizers.token_dtype(70000) == np.uint32
  assert tokenizers.token_dtype(65536) == np.uint16
  config = lm_config()
  config.data.tokenizer = "sentencepiece"
  with pytest.raises(ConfigError, match=r"data.tokenizer='sentencepiece'"):
    dbjax.config.validate(config)


def subword_config(corpus_file, kind="autoregressive", tokenizer="bpe:300"):
  config = lm_config(kind)
  config.data.name, config.data.tokenizer = f"file:{corpus_file}", tokenizer
  config.data.vocab_size = 0  # from the tokenizer
  config.language.prompt = "To be"
  config.eval.update(enabled=True, max_test_examples=4)
  return config


def subword_run(corpus_file, workdir, kind="autoregressive", method="diffusion_blocks"):
  """(config, metrics) of a tiny run on BPE, evaluated, in `workdir`."""
  if kind == "recurrent":
    config = recurrent_config()
    config.data.name, config.data.tokenizer = f"file:{corpus_file}", "bpe:300"
    config.data.vocab_size = 0
    config.language.prompt = "To be"
    config.eval.update(enabled=True, max_test_examples=4)
  else:
    config = subword_config(corpus_file, kind)
    config.method = method
  return config, dbjax.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def ar_subword_run(tmp_path_factory):
  """(config, metrics, workdir) of the autoregressive DiffusionBlocks run on BPE that
  two tests read (neither writes to it)."""
  root = tmp_path_factory.mktemp("ar_subword")
  (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
  config, metrics = subword_run(root / "corpus.txt", root / "run")
  return config, metrics, root / "run"


@pytest.mark.parametrize("kind,method", [
    ("autoregressive", "diffusion_blocks"),
    # The other tasks take the same path through the tokenizer: the slow set.
    pytest.param("masked", "diffusion_blocks", marks=pytest.mark.slow),
    pytest.param("autoregressive", "end_to_end", marks=pytest.mark.slow),
    pytest.param("recurrent", "diffusion_blocks", marks=pytest.mark.slow)])
def test_a_subword_run_trains_saves_its_tokenizer_and_reports_bits_per_character(
    corpus_file, tmp_path, kind, method, request):
  """AR, MD4, the causal baseline and the recurrent-depth task on BPE: the vocabulary
  is the tokenizer's, tokenizer.json is saved, samples decode to text that starts with
  the prompt, and bits per character are bits per token over the characters each token
  stands for."""
  if (kind, method) == ("autoregressive", "diffusion_blocks"):
    config, metrics, workdir = request.getfixturevalue("ar_subword_run")
  else:
    workdir = tmp_path / "run"
    config, metrics = subword_run(corpus_file, workdir, kind, method)
  assert os.path.exists(workdir / tokenizers.TOKENIZER_FILE)
  assert metrics["tokenizer"] == "bpe:300" and metrics["vocab_size"] == 300
  assert metrics["characters_per_token"] > 1.5
  assert metrics["test_characters"] > metrics["test_tokens"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["vocab_size"] == 300
  samples = (workdir / "samples.txt").read_text(encoding="utf-8")
  assert samples.count("To be") >= config.language.num_samples


def test_another_tokenizer_on_a_run_is_refused_and_the_saved_one_is_read(ar_subword_run):
  config, _, workdir = ar_subword_run
  config = config.copy_and_resolve_references()
  for other in ("characters", "bpe:400"):
    config.data.tokenizer = other
    with pytest.raises(ConfigError, match=rf"data.tokenizer='{other}', but the run in .* was "
                                          r"trained with 'bpe:300'"):
      language.load_data(config, str(workdir))
  # The saved file as a tokenizer of a new run: the same ids.
  config.data.tokenizer = str(workdir / tokenizers.TOKENIZER_FILE)
  _, again = language.load_data(config)
  config.data.tokenizer = "bpe:300"
  _, first = language.load_data(config, str(workdir))
  np.testing.assert_array_equal(again.train.tokens, first.train.tokens)


@pytest.mark.slow  # two trainings and three launches of the command, 35 s
def test_text_quality_scores_a_subword_run_in_bits_per_character(corpus_file, tmp_path):
  """experiments.text_quality on a BPE run with a BPE judge trained on the same text: the
  real continuations' generative bits are the judge's per-token bits over the
  characters they decode to; a judge with another tokenizer is refused in one line."""
  from dbjax import train  # pylint: disable=g-import-not-at-top
  from dbjax.eval import text_quality  # pylint: disable=g-import-not-at-top
  from tests.test_experiments import run_cli  # pylint: disable=g-import-not-at-top
  config = subword_config(corpus_file)
  config.method, config.eval.enabled = "end_to_end", False
  config.language.seq_len = 24
  workdir = tmp_path / "run"
  train.train(config, str(workdir))
  run_cli("experiments.text_quality", f"--workdir={workdir}", f"--judge={workdir}",
          "--num_samples=8", "--prompt_length=4", "--length=12", "--num_steps=1")
  scores = json.loads((workdir / "text_quality_t1_p1_seed0.json").read_text())
  own = train.restore_run(str(workdir))
  test = train.load_run_data(own[0], str(workdir))[1].test
  real = text_quality.held_out_texts(test.tokens, 8, 16, 0)
  _, per_token = text_quality.judge_texts(own[1], own[2][0].params, own[3].params, real, 4)
  characters = [len(test.vocabulary.decode(t[4:])) for t in real]
  expected = np.mean(np.asarray(per_token) * 12 / np.asarray(characters))
  assert scores["rows"][0]["real_bits_per_character"] == pytest.approx(expected, rel=1e-5)
  assert min(characters) > 12  # subwords: more characters than tokens
  characters_run = tmp_path / "characters"
  config.data.tokenizer, config.data.vocab_size = "characters", 0
  train.train(config, str(characters_run))
  refused = run_cli("experiments.text_quality", f"--workdir={workdir}",
                    f"--judge={characters_run}", "--num_samples=8", "--prompt_length=4",
                    "--length=12", check=False)
  assert refused.returncode == 2 and "reads another vocabulary" in refused.stderr
