r"""Score a language run on its samples, as the paper does: MAUVE against real text,
generative bits per character under a judge LM, and diversity (dbjax.eval.text_quality).

  python -m experiments.text_quality --workdir=runs/compare_shakespeare_ar/diffusion_blocks \
      --judge=runs/compare_shakespeare_ar/end_to_end --num_samples=256 --length=64
  python -m experiments.text_quality --workdir=runs/recurrent_top_800 \
      --judge=runs/compare_shakespeare_ar/end_to_end --num_steps=1,2,4,8,16,32

From a fixed draw of --num_samples test sequences (the same for every run with the same
--seed), each text's first --prompt_length tokens are the prompt and the next
--length tokens the real continuation (characters for a character run; a subword run's
bits per character are over the characters its tokens decode to); the run continues each prompt with one sample
(key seed, prompt index), so two runs scored with the same flags see the same prompts and
keys. Works on any language run: autoregressive, MD4, recurrent (at each K of
--num_steps) and their end-to-end baselines. The judge is an end-to-end causal LM trained
on the training split only (not the paper's GPT-2; docs/language.md says what that means).
Writes <workdir>/text_quality_<settings>.json (or --out), prints a table, and plots each
measure against K where --num_steps lists several.
"""
import json
import os
import time

import jax
import numpy as np
from absl import flags

from dbjax import tasks
from dbjax.data import text, tokenizers
from dbjax.errors import ConfigError
from dbjax.eval import text_quality
from dbjax.train import load_run_data, restore_run
from experiments.cli import print_table, run, with_field, write_json

_WORKDIR = flags.DEFINE_string("workdir", None, "the language run to score")
_JUDGE = flags.DEFINE_string("judge", "runs/compare_shakespeare_ar/end_to_end",
                             "an end-to-end causal LM run on the same text (its training "
                             "split only): the judge")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256, "texts scored (each side)")
_LENGTH = flags.DEFINE_integer("length", 64, "tokens (characters for a character run) "
                               "generated after each prompt")
_PROMPT = flags.DEFINE_integer("prompt_length", 32, "tokens of each prompt")
_STEPS = flags.DEFINE_list("num_steps", None, "denoising calls per token, MD4 steps or "
                           "recurrent iterations K; several give a curve (default: the run's)")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "sampling temperature (0: greedy)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass (1: all)")
_BRIDGE = flags.DEFINE_enum("bridge", None, ["argmax", "expected"],
                            "the chain's Euler bridge (default: the run's)")
_SEED = flags.DEFINE_integer("seed", 0, "which test texts and which sampling keys")
_OUT = flags.DEFINE_string("out", None, "JSON path (default: in the workdir)")
flags.mark_flags_as_required(["workdir"])


def sample_continuations(task, states, shared, real: np.ndarray, prompt_length: int,
                         num_steps, seed: int) -> np.ndarray:
  """Each prompt continued by one sample (task.continue_prompts), as long as the real."""
  return task.continue_prompts([s.params for s in states], shared.params,
                               real[:, :prompt_length], real.shape[1], seed,
                               _TEMPERATURE.value, _TOP_P.value, num_steps)


def main(argv):
  del argv
  length = _PROMPT.value + _LENGTH.value
  config, task, states, shared = restore_run(_WORKDIR.value)
  if config.task not in ("language", "recurrent_depth"):
    raise ConfigError(f"--workdir={_WORKDIR.value} holds a config.task={config.task!r} run; "
                      "text_quality scores language runs")
  bridge = getattr(task, "bridge", None)  # None: no chain (MD4, the end-to-end baselines)
  if _BRIDGE.value is not None:
    if bridge is None:
      raise ConfigError(f"--bridge={_BRIDGE.value}: {_WORKDIR.value} samples without an Euler "
                        f"bridge (method {config.method}, kind {config.language.kind}); "
                        "DiffusionBlocks' autoregressive and recurrent runs have one")
    config = with_field(config, "language.bridge", _BRIDGE.value)
    task, bridge = tasks.build(config), _BRIDGE.value
  judge_config, judge, judge_states, judge_shared = restore_run(_JUDGE.value)
  config, data = load_run_data(config, _WORKDIR.value)
  vocabulary = data.test.vocabulary
  # The tokenizer the judge trained with, as its run saved it (its text is not re-read).
  judge_vocabulary = tokenizers.saved(_JUDGE.value)
  if judge_vocabulary is None:
    raise ConfigError(f"--judge={_JUDGE.value}: no {text.VOCABULARY_FILE} or "
                      f"{tokenizers.TOKENIZER_FILE}; a judge is a language run")
  if not tokenizers.same_ids(judge_vocabulary, vocabulary):
    raise ConfigError(f"--judge={_JUDGE.value} reads another vocabulary than "
                      f"{_WORKDIR.value}: train the judge on the same text and tokenizer")
  if length > min(config.language.seq_len, judge_config.language.seq_len):
    raise ConfigError(f"--prompt_length + --length = {length}: longer than a sequence "
                      f"(seq_len {config.language.seq_len}, the judge's "
                      f"{judge_config.language.seq_len})")
  real = text_quality.held_out_texts(data.test.tokens, _NUM_SAMPLES.value, length,
                                     _SEED.value)
  steps = [int(k) for k in _STEPS.value] if _STEPS.value else [None]
  rows = []
  for k in steps:
    start = time.perf_counter()
    generated = sample_continuations(task, states, shared, real, _PROMPT.value, k,
                                     _SEED.value)
    seconds = time.perf_counter() - start
    scores = text_quality.score(judge, judge_states[0].params, judge_shared.params, real,
                                generated, _PROMPT.value, vocabulary.decode, seed=_SEED.value)
    rows.append({"num_steps": k if k is not None else "default", **scores,
                 "sampling_seconds": seconds,
                 "example": vocabulary.decode(generated[0])})
  settings = {"workdir": _WORKDIR.value, "judge": _JUDGE.value, "method": config.method,
              "task": config.task, "kind": config.language.kind,
              "bridge": bridge, "num_samples": _NUM_SAMPLES.value,
              "prompt_length": _PROMPT.value, "length": _LENGTH.value,
              "temperature": _TEMPERATURE.value, "top_p": _TOP_P.value, "seed": _SEED.value,
              "mauve_buckets": text_quality.NUM_BUCKETS, "device": jax.devices()[0].device_kind}
  name = (f"text_quality_t{_TEMPERATURE.value:g}_p{_TOP_P.value:g}"
          f"{'_' + bridge if bridge else ''}_seed{_SEED.value}")
  out = _OUT.value or os.path.join(_WORKDIR.value, name + ".json")
  print_table(rows, ["num_steps", "mauve", "generative_bits_per_character",
                     "real_bits_per_character", "distinct_2", "real_distinct_2",
                     "unigram_entropy_bits", "sampling_seconds"])
  write_json(out, {**settings, "rows": rows})
  if len(steps) > 1:
    text_quality.save_curves({config.method: {r["num_steps"]: r for r in rows}},
                             out[:-len(".json")])
  print(json.dumps(rows[0]["example"]))


if __name__ == "__main__":
  run(main)
