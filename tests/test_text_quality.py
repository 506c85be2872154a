"""dbjax.eval.text_quality: the measures score what they claim, with a judge trained here
on Shakespeare's training split (MAUVE of real against real text is high, against random
characters low, a unigram sampler in between; the judge's generative bits per character
of real text is its own test bits per character)."""
import math

import numpy as np
import pytest

from dbjax import config as config_lib, tasks, train
from dbjax.eval import text_quality
from dbjax.sampling import stack_params
from tests.conftest import shrink_model

LENGTH = 64   # characters per text
PROMPT = 16   # of which the prompt


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
  """(task, params, shared params, test data) of a small causal LM, 300 steps on the plays."""
  config = shrink_model(config_lib.default_config("language"))
  config.method, config.data.name = "end_to_end", "shakespeare"
  config.language.kind, config.language.seq_len = "autoregressive", LENGTH
  config.model.num_layers, config.model.hidden_size = 2, 64
  config.train.num_steps, config.train.batch_size, config.train.warmup_steps = 300, 32, 20
  config.train.checkpoint_every, config.train.learning_rate = 300, 3e-3
  config, data = tasks.load_data(config_lib.validate(config))
  task, states, shared, _ = train.train(config, str(tmp_path_factory.mktemp("judge")),
                                        data.train)
  return task, states[0].params, shared.params, data


@pytest.mark.slow  # the judge trains 300 steps, 75 s for the module
def test_mauve_separates_real_text_from_random_characters_with_a_unigram_sampler_between(judge):
  task, params, shared, data = judge
  tokens = np.asarray(data.test.tokens[:512])
  first, second = tokens[:256], tokens[256:]  # two disjoint halves of the test split
  rng = np.random.default_rng(0)
  vocab = data.test.vocabulary.size
  uniform = np.concatenate([second[:, :PROMPT], rng.integers(0, vocab, (256, LENGTH - PROMPT))],
                           axis=1)
  counts = np.bincount(np.asarray(data.train.tokens).ravel(), minlength=vocab)
  unigram = np.concatenate([second[:, :PROMPT], rng.choice(vocab, (256, LENGTH - PROMPT),
                                                           p=counts / counts.sum())], axis=1)
  features = lambda t: text_quality.judge_texts(task, params, shared, t, PROMPT)[0]
  real = features(first)
  scores = {name: text_quality.mauve_score(real, features(t))
            for name, t in (("real", second), ("unigram", unigram), ("uniform", uniform))}
  assert scores["real"] > 0.9, scores
  assert scores["uniform"] < 0.1, scores
  assert scores["uniform"] < scores["unigram"] < scores["real"], scores


@pytest.mark.slow  # the judge trains 300 steps, 75 s for the module
def test_the_judges_bits_per_character_of_real_text_is_its_own_test_figure(judge):
  task, params, shared, data = judge
  tokens = np.asarray(data.test.tokens[:64])
  _, bits = text_quality.judge_texts(task, params, shared, tokens, prompt_length=0)
  nats = task.sequence_nats(stack_params([params]), shared, tokens, None)["headline"]
  np.testing.assert_allclose(bits, np.asarray(nats) / math.log(2), rtol=1e-5)
  # After a prompt of P characters only the continuation is scored: a causal judge's
  # first P characters score the same alone, so the whole text's total splits in two.
  # An average over the prompt too would give the whole text's mean here.
  _, after_prompt = text_quality.judge_texts(task, params, shared, tokens, PROMPT)
  _, prompt_alone = text_quality.judge_texts(task, params, shared, tokens[:, :PROMPT], 0)
  np.testing.assert_allclose(bits * LENGTH, prompt_alone * PROMPT
                             + after_prompt * (LENGTH - PROMPT), rtol=1e-4)
  assert np.abs(after_prompt - bits).max() > 1e-2


def test_diversity_catches_repetition():
  varied = text_quality.diversity(["to be or not to be that is the question"])
  repeated = text_quality.diversity(["the the the the the the the the the the"])
  # "to be" comes twice among the 9 bigrams; the repetition has 1 distinct of 9.
  assert varied["distinct_2"] == pytest.approx(8 / 9)
  assert repeated["distinct_2"] == pytest.approx(1 / 9)
  assert repeated["unigram_entropy_bits"] == 0.0  # one word
  # "to" and "be" are 2 of the 10 words each, the 6 others 1 each.
  assert varied["unigram_entropy_bits"] == pytest.approx(
      -(2 * 0.2 * math.log2(0.2) + 6 * 0.1 * math.log2(0.1)))


@pytest.mark.slow  # a training and a command-line launch, 60 s
def test_the_command_scores_a_run_with_a_judge_and_writes_its_settings(judge, tmp_path):
  from tests.test_experiments import run_cli  # pylint: disable=g-import-not-at-top
  task, params, shared, data = judge
  workdir = tmp_path / "run"
  config = shrink_model(config_lib.default_config("language"))
  config.method, config.data.name = "end_to_end", "shakespeare"
  config.language.seq_len, config.model.num_layers = LENGTH, 2
  config.train.num_steps, config.train.batch_size, config.eval.enabled = 20, 8, False
  train.train_and_evaluate(config, str(workdir))
  result = run_cli("experiments.text_quality", f"--workdir={workdir}", f"--judge={workdir}",
                   "--num_samples=40", "--prompt_length=16", "--length=32", "--top_p=0.9",
                   "--num_steps=1,2")
  out = workdir / "text_quality_t1_p0.9_seed0.json"  # an end-to-end LM: no bridge
  import json  # pylint: disable=g-import-not-at-top
  scores = json.loads(out.read_text())
  assert scores["top_p"] == 0.9 and scores["num_samples"] == 40 and scores["bridge"] is None
  assert [r["num_steps"] for r in scores["rows"]] == [1, 2]
  # The real texts' bits, recomputed here from the same held-out rows: the continuation's
  # 16 characters scored, not the prompt's.
  own = train.restore_run(str(workdir))
  own_data = train.load_run_data(own[0], str(workdir))[1]
  real = text_quality.held_out_texts(own_data.test.tokens, 40, 16 + 32, 0)  # prompt, then --length
  _, real_bits = text_quality.judge_texts(own[1], own[2][0].params, own[3].params, real, 16)
  for row in scores["rows"]:
    assert row["real_bits_per_character"] == pytest.approx(float(np.mean(real_bits)), rel=1e-5)
  assert (workdir / "text_quality_t1_p0.9_seed0_mauve.png").exists()
  assert "mauve" in result.stdout
  refused = run_cli("experiments.text_quality", f"--workdir={workdir}", f"--judge={workdir}",
                    "--bridge=expected", check=False)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1].endswith(
      "samples without an Euler bridge (method end_to_end, kind autoregressive); "
      "DiffusionBlocks' autoregressive and recurrent runs have one")


def _scored(path, steps, seed=0, mauve=0.5):
  """A text_quality output with rows at `steps` (what the plot reads of it)."""
  import json  # pylint: disable=g-import-not-at-top
  rows = [{"num_steps": k, "mauve": mauve + k / 100, "generative_bits_per_character": 3.0,
           "distinct_2": 0.9} for k in steps]
  path.write_text(json.dumps({"judge": "j", "num_samples": 256, "prompt_length": 32,
                              "length": 32, "temperature": 1.0, "top_p": 0.9, "seed": seed,
                              "rows": rows}))
  return str(path)


def test_the_plot_merges_a_models_files_by_k_and_refuses_unlike_settings(tmp_path):
  from tests.test_experiments import run_cli  # pylint: disable=g-import-not-at-top
  a, b = _scored(tmp_path / "a.json", [1, 2]), _scored(tmp_path / "b.json", [16])
  other = _scored(tmp_path / "c.json", [1, 2], mauve=0.2)
  out = tmp_path / "curves"
  result = run_cli("studies.plot_text_quality", f"--curve=DB={a},{b}",
                   f"--curve=share=0.5={other}", f"--out={out}")
  table = [line.split() for line in result.stdout.splitlines()[1:6]]
  assert [(row[0], row[1], row[2]) for row in table] == [
      ("DB", "1", "0.51"), ("DB", "2", "0.52"), ("DB", "16", "0.66"),
      ("share=0.5", "1", "0.21"), ("share=0.5", "2", "0.22")]
  for measure in ("mauve", "generative_bits_per_character", "distinct_2"):
    assert (tmp_path / f"curves_{measure}.png").stat().st_size > 0
  twice = run_cli("studies.plot_text_quality", f"--curve=DB={a},{a}", f"--out={out}",
                  check=False)
  assert twice.returncode == 2 and "K = 1 is in two of its files" in twice.stderr
  reseeded = _scored(tmp_path / "d.json", [4], seed=1)
  unlike = run_cli("studies.plot_text_quality", f"--curve=DB={a},{reseeded}",
                   f"--out={out}", check=False)
  assert unlike.returncode == 2 and "with seed=1" in unlike.stderr
  missing = run_cli("studies.plot_text_quality", f"--curve=DB={tmp_path / 'no.json'}",
                    f"--out={out}", check=False)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'no.json'} does not exist")
