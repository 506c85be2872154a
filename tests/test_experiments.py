"""One-step smoke runs of every experiment config, and the command line itself."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flax import nnx

from dbjax import tasks
from dbjax.config import from_saved
from dbjax.engine import planning
from dbjax.errors import ConfigError
from dbjax.train import load_run, train_and_evaluate
from experiments.cli import available_configs, method_variant, with_field
from tests.conftest import shrink_model, tiny_config
from tests.test_data import write_idx
from tests.test_metric_log import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.basename(p)[:-3] for p in available_configs()]


def load_config(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrink(config):
  """Keep the config's data and shapes, cut the work to one step of each block."""
  config = shrink_model(config)
  config.train.num_steps = 1
  config.train.batch_size = 4
  if "sample" in config:
    config.sample.num_steps = config.diffusion.num_blocks
    config.sample.grid_size = 2
  if "classifier" in config:
    config.classifier.inference_steps = (1,)
  if "language" in config:
    config.language.seq_len, config.language.num_samples = 8, 1
    config.language.prompt = ""
  config.eval.enabled = config.task == "classification"  # accuracy is cheap; FD is not
  return config


def test_every_config_is_listed():
  assert {"digits", "fashion_mnist", "mnist", "cifar10", "classify_digits",
          "classify_fashion_mnist", "classify_cifar100", "shakespeare_ar", "shakespeare_md4",
          "lm1b", "shakespeare_recurrent", "fashion_mnist_latent",
          "imagenet256_latent"} <= set(CONFIGS)


# In the default run, one config of each task and of each local way of reading data; the
# others, whose task and reader those cover, in the slow set (digits: the command-line
# test below; tfds by name, images and text: tests/test_data.py and test_language.py;
# MD4: test_language.py's runs).
SLOW_SMOKE_RUNS = {"digits", "mnist", "cifar10", "classify_fashion_mnist", "classify_cifar100",
                   "lm1b", "shakespeare_md4", "shakespeare_recurrent", "imagenet256_latent"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name in SLOW_SMOKE_RUNS else name for name in CONFIGS])
def test_one_step_smoke_run(name, tmp_path):
  config = shrink(load_config(name))
  if config.data.name == "fashion_mnist":  # small IDX files standing in for the real set
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
      write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
      write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(8) % 10)
    config.data.data_dir = str(tmp_path)
  if config.data.name.startswith("latents:"):  # random latents standing in for encoded ones
    from tests.test_own_data import write_latents  # pylint: disable=g-import-not-at-top
    shape = {"fashion_mnist_latent": (7, 7, 4), "imagenet256_latent": (32, 32, 4)}[name]
    config.data.name = f"latents:{write_latents(tmp_path / 'latents', shape=shape)}"
  if config.data.name.startswith("tfds:"):
    with tfds.testing.mock_data(num_examples=8 if config.task != "language" else 40,
                                policy=tfds.testing.MockPolicy.USE_CODE):
      results = train_and_evaluate(config, str(tmp_path / "run"))
  else:
    results = train_and_evaluate(config, str(tmp_path / "run"))
  assert results["iterations"] == config.diffusion.num_blocks
  picture = {"classification": "confusion.png", "language": "vocabulary.json",
             "recurrent_depth": "vocabulary.json"}.get(config.task, "samples.png")
  assert os.path.exists(tmp_path / "run" / picture)
  # The run loads back from Python: the model, each block's parameters, the config it
  # trained with (also in config.json, data-derived fields filled in).
  run = load_run(str(tmp_path / "run"))
  with open(tmp_path / "run" / "config.json") as f:
    saved = json.load(f)
  assert from_saved(saved).to_dict() == run.config.to_dict()
  # config.json holds what applies to the run: its task's own sections, no other's.
  assert set(saved) - {"data", "diffusion", "eval", "method", "model", "parallel", "seed",
                       "task", "train"} == set(tasks.config_sections(config.task))
  assert run.config.data.vocab_size > 0 or config.task not in ("language", "recurrent_depth")
  assert run.iteration == results["iterations"] and len(run.params) == run.task.num_blocks
  # metrics.json names the objective and the metric loss_curves.png plots apart.
  if run.task.curve_metric != "loss":
    assert set(results[f"final_{run.task.curve_metric}_per_block"]) == set(
        results["final_loss_per_block"])
  assert isinstance(run.network(run.task.num_blocks - 1), nnx.Module)


def run_cli(*args, check=True):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                        text=True, check=check, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
def test_ctrl_c_while_a_command_imports_jax_ends_it_in_one_line(tmp_path):
  train = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/digits.py",
           f"--workdir={tmp_path}"]
  # SIGINT as from a terminal, even where this test runs in the background with SIGINT
  # ignored: the command execs from a process that sets it back to the default.
  command = subprocess.Popen(
      [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
       "signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])", *train],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.monotonic() + 60
  while "/jaxlib/" not in open(f"/proc/{command.pid}/maps").read():  # jax is importing
    assert time.monotonic() < deadline and command.poll() is None
    time.sleep(0.005)
  time.sleep(0.1)  # past the loading of jaxlib's library, during which SIGINT kills at once
  command.send_signal(signal.SIGINT)
  stderr = command.communicate(timeout=60)[1]
  assert command.returncode == 130
  assert "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGINT)")


def test_command_line_trains_samples_and_evaluates(tmp_path):
  workdir = str(tmp_path / "run")
  small = ["--config.model.num_layers=3", "--config.model.hidden_size=32",
           "--config.model.num_heads=2", "--config.train.num_steps=2",
           "--config.train.batch_size=8", "--config.sample.num_steps=3",
           "--config.sample.grid_size=2", "--config.eval.num_samples=50",
           "--config.eval.classifier_steps=5", f"--config.eval.cache_dir={tmp_path / 'cache'}"]
  trained = run_cli("experiments.train", "--config=experiments/configs/digits.py",
                    f"--workdir={workdir}", *small)
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["iterations"] == 6
  # Output to a file or pipe: the progress bar as plain lines, compile time on its own.
  assert "\r" not in trained.stderr
  assert "training diffusion_blocks, iterations: compiled in " in trained.stderr
  assert "training diffusion_blocks, iterations: 100% 6/6 [" in trained.stderr
  # Metrics on the console, in the JSONL file and in TensorBoard, one curve per block.
  assert "iteration 6/6  loss  block " in trained.stdout
  # A warmup (50 updates, the default) longer than the 2 each block gets: one line.
  warning, = [l for l in trained.stderr.splitlines() if "warmup_steps" in l]
  assert warning.startswith("warning: config.train.warmup_steps=50 is not below "
                            "config.train.num_steps=2 (the updates each block gets)")
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for b in {r["block"] for r in rows}:
    assert scalars[f"block_{b}/loss"] == [(r["step"], pytest.approx(r["loss"]))
                                          for r in rows if r["block"] == b]
  assert "eval/frechet_distance" in scalars
  out = str(tmp_path / "heun.png")
  run_cli("experiments.sample", f"--workdir={workdir}", "--solver=heun", "--num_steps=4",
          f"--out={out}")
  assert os.path.getsize(out) > 0
  result = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_steps=3",
                   "--num_samples=50")
  assert "frechet_distance" in result.stdout
  # Continued with no --config: the run's saved config, with overrides on top.
  resumed = run_cli("experiments.train", f"--workdir={workdir}", "--config.train.num_steps=3",
                    "--config.eval.enabled=False")
  assert f"continuing the run in {workdir} with its saved config" in resumed.stderr
  assert "resuming from the checkpoint of iteration 6" in resumed.stdout
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["iterations"] == 9
  # Its config.json is a config file: --help lists its values (3 layers), exit status 0.
  shown = run_cli("experiments.train", f"--config={workdir}/config.json", "--help")
  assert "num_layers=3" in shown.stdout and "num_steps=3" in shown.stdout


@pytest.mark.slow  # three launches, 65 s; the classifier trains in process in the smoke run
def test_command_line_classifier_trains_and_evaluates_any_number_of_steps(tmp_path):
  workdir = str(tmp_path / "run")
  small = ["--config.model.num_layers=2", "--config.model.hidden_size=32",
           "--config.model.num_heads=2", "--config.train.num_steps=3",
           "--config.train.batch_size=8", "--config.train.progress=False",
           "--config.diffusion.num_blocks=2", "--config.classifier.inference_steps=(1,)"]
  run_cli("experiments.train", "--config=experiments/configs/classify_digits.py",
          f"--workdir={workdir}", *small)
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["iterations"] == 6 and set(metrics["accuracy_by_steps"]) == {"1", "2"}
  result = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_steps=5",
                   "--bridge=expected")
  assert "accuracy" in result.stdout
  with open(os.path.join(workdir, "eval_steps_5_expected.json")) as f:
    assert set(json.load(f)["accuracy_by_steps"]) == {"2", "5"}  # B and the asked N
  refused = run_cli("experiments.sample", f"--workdir={workdir}", check=False)
  assert refused.returncode == 2 and "classification" in refused.stderr


@pytest.mark.slow  # three launches, 65 s; the language model trains in the smoke run
def test_command_line_language_model_trains_samples_and_evaluates(tmp_path):
  workdir = str(tmp_path / "run")
  small = ["--config.model.num_layers=2", "--config.model.hidden_size=16",
           "--config.model.num_heads=2", "--config.model.frequency_dim=16",
           "--config.train.num_steps=2", "--config.train.batch_size=4",
           "--config.train.progress=False", "--config.diffusion.num_blocks=2",
           "--config.language.seq_len=16", "--config.language.num_samples=1",
           "--config.eval.max_test_examples=4"]
  result = run_cli("experiments.train", "--config=experiments/configs/shakespeare_ar.py",
                   f"--workdir={workdir}", *small)
  assert "===== top-p 0.9, sample 0 =====\nThe " in result.stdout  # the samples, printed
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["test_characters"] == 64 and "bits_per_character_fixed_seed_chain" in metrics
  assert 0 < metrics["bits_per_character"] and metrics["generated_chars_per_second"] > 0
  with open(os.path.join(workdir, "samples.txt"), encoding="utf-8") as f:
    assert f.read().count("=====\nThe ") == 3  # greedy, temperature, top-p; one sample each
  result = run_cli("experiments.sample", f"--workdir={workdir}", "--prompt=ROMEO.",
                   "--temperature=0", "--num_samples=2")
  assert result.stdout.count("=====\nROMEO.") == 2
  refused = run_cli("experiments.sample", f"--workdir={workdir}", "--bridge=argmax",
                    "--temperature=0.8", check=False)
  assert refused.returncode != 0 and "changes nothing" in refused.stderr.strip().splitlines()[-1]
  result = run_cli("experiments.evaluate", f"--workdir={workdir}", "--num_steps=4",
                   "--mixture_chains=3", "--max_test_examples=2")
  with open(os.path.join(workdir, "eval_steps_4_expected.json")) as f:
    evaluated = json.load(f)
  assert evaluated["inference_steps"] == 4 and evaluated["mixture_chains"] == 3
  assert evaluated["test_characters"] == 32
  # Jensen: the mixture's CE is at most the mean of its chains', and positive.
  assert 0 < evaluated["bits_per_character_chain_mixture"]


def test_help_lists_every_config_and_every_field():
  text = run_cli("experiments.train", "--help").stdout  # exit status 0 (absl's: 1)
  for name in CONFIGS:
    assert f"experiments/configs/{name}.py" in text
  assert "Config fields, set with --config.<field>=<value>" in text
  for field in ("num_steps=600", "warmup_steps=50", "num_blocks=3", "kind='autoregressive'",
                "mean_iterations=8", "shared_sync_every=0", "method='diffusion_blocks'"):
    assert field in text
  # With a config, its own fields alone: a digits run has no language section.
  digits = run_cli("experiments.train", "--config=experiments/configs/digits.py",
                   "--help").stdout
  assert "  sample: " in digits and "  language: " not in digits and "classifier:" not in digits


@pytest.mark.parametrize("flag,message", [
    ("--config.train.num_step=5", "--config.train.num_step: no such config field (did you "
     "mean 'train.num_steps'?); the fields of config.train are: train.adam_b1,"),
    ("--config.trian.num_steps=5", "(did you mean 'train.num_steps'?)"),
    ("--config=experiments/configs/digit.py", "--config=experiments/configs/digit.py: no such "
     "file (did you mean 'experiments/configs/digits.py'?); the configs are:"),
    ("--config.diffusion.num_blocks=5", "diffusion.num_blocks=5"),
    ("--config.data.name=imagenet", "config.data.name='imagenet'"),
    ("--config.language.kind=masked", "--config.language.kind: a field of the config of "
     "task 'language' and 'recurrent_depth', not of this config.task='generation' run's"),
    ("--config.task=language", "--config.task=language: experiments/configs/digits.py is a "
     "config.task='generation' config"),
])
def test_command_line_errors_are_one_line(flag, message, tmp_path):
  result = run_cli("experiments.train", "--config=experiments/configs/digits.py",
                   f"--workdir={tmp_path}", flag, check=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("arguments,message", [
    (["--config=experiments/configs/digits.py", "--config.train.num_steps=ten"],
     "error: flag --config.train.num_steps=ten: invalid literal for int()"),
    (["--config=experiments/configs/digits.py", "--config.model.remat=yes"],
     "error: flag --config.model.remat=yes: ('Non-boolean argument to boolean flag', 'yes')"),
    (["--config=experiments/configs/digits.py", "--parallel=block"],
     "error: flag --parallel=block: value should be one of <none|blocks>"),
    ([], "error: --config: not given, and --workdir="),  # a workdir with no run in it
])
def test_usage_errors_exit_2_in_one_line_whoever_catches_them(arguments, message, tmp_path):
  result = run_cli("experiments.train", f"--workdir={tmp_path}", *arguments, check=False)
  assert (result.returncode, result.stderr.strip().splitlines()) == (2, [mock.ANY])
  assert result.stderr.startswith(message), result.stderr


@pytest.mark.parametrize("command,flag", [("experiments.sample", "--helpshort"),
                                          ("experiments.evaluate", "--help")])
def test_help_exits_0(command, flag):
  assert "--workdir" in run_cli(command, flag).stdout


def test_help_shows_the_values_of_the_config_given():
  text = run_cli("experiments.train", "--config=experiments/configs/fashion_mnist.py",
                 "--help").stdout
  assert "Config fields, set with --config.<field>=<value> (this config's values" in text
  assert "image_size=28" in text and "image_size=8" not in text


# A tiny network for any task's config; TINY_FLAGS adds the image configs' sampling.
NETWORK_FLAGS = ["--config.model.num_layers=2", "--config.model.hidden_size=32",
                 "--config.model.num_heads=2", "--config.model.frequency_dim=32",
                 "--config.train.batch_size=8"]
TINY_FLAGS = NETWORK_FLAGS + ["--config.sample.num_steps=2"]


@pytest.mark.slow
def test_bench_memory_writes_one_json_line_per_configuration(tmp_path):
  out = tmp_path / "memory.jsonl"
  result = run_cli("benchmarks.bench_memory", "--config=experiments/configs/digits.py",
                   "--num_blocks=2", "--time", f"--out={out}", *TINY_FLAGS)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["dtype"], r["method"], r["num_blocks"]) for r in rows] == [
      (dtype, method, b) for dtype in ("float32", "bfloat16") for method, b in [
          ("end_to_end", 1), ("diffusion_blocks", 2), ("end_to_end_remat", 1),
          ("diffusion_blocks_remat", 2)]]
  for row in rows:
    assert row["step_bytes"] > 0 and row["resident_bytes"] > 0
  assert rows[1]["step_ratio"] == rows[0]["step_bytes"] / rows[1]["step_bytes"]
  assert rows[1]["step_time_ratio"] == rows[0]["step_ms"] / rows[1]["step_ms"] > 0
  assert rows[1]["resident_bytes"] < rows[0]["resident_bytes"]
  # bfloat16 against float32, the same method: the state is float32 in both.
  assert rows[4]["activations_vs_float32"] < 0.7 and rows[4]["state_bytes"] == rows[0][
      "state_bytes"]
  assert all(column in result.stdout
             for column in ("step_ratio", "activations_vs_float32", "step_time_ratio"))


@pytest.mark.slow
def test_bench_speed_reports_the_ratio(tmp_path):
  out = tmp_path / "speed.json"
  run_cli("benchmarks.bench_speed", "--config=experiments/configs/digits.py",
          "--config.diffusion.num_blocks=2", "--repeats=2", "--num_samples=4",
          f"--out={out}", *TINY_FLAGS)
  summary = json.loads(out.read_text())
  e2e, db = summary["rows"]
  assert summary["step_time_ratio"] == e2e["step_seconds"] / db["step_seconds"]
  assert db["layers_per_step"] == 1 and e2e["layers_per_step"] == 2


@pytest.mark.slow
def test_single_stream_probe_trains_and_reports_its_memory(tmp_path):
  out = tmp_path / "probe.json"
  run_cli("studies.probe_single_stream", "--config.train.num_steps=1",
          "--config.model.num_layers=4", "--config.language.seq_len=16",
          "--config.eval.max_test_examples=32", f"--out={out}")
  summary = json.loads(out.read_text())
  assert summary["iterations"] == 4
  # One block of 1 layer on T tokens against 4 layers end to end.
  assert summary["memory_ratio_vs_end_to_end"] > 2
  assert 0 < summary["first_call_bits_per_character"] < 8


@pytest.mark.slow
def test_classifier_chain_probe_reports_every_block(tmp_path):
  workdir = str(tmp_path / "run")
  run_cli("experiments.train", "--config=experiments/configs/classify_digits.py",
          f"--workdir={workdir}", "--config.model.num_layers=3", "--config.model.hidden_size=32",
          "--config.model.num_heads=2", "--config.train.num_steps=3",
          "--config.train.batch_size=8", "--config.train.progress=False",
          "--config.eval.enabled=False")
  out = tmp_path / "probe.json"
  run_cli("studies.probe_classifier_chain", f"--workdir={workdir}",
          "--test_examples=40", "--repeats=1", f"--out={out}")
  summary = json.loads(out.read_text())
  assert [row["block"] for row in summary["blocks"]] == [0, 1, 2]
  first = summary["blocks"][0]  # at sigma_max the token carries nothing
  assert first["sigma"] == 80 and first["true_label"] == first["random_label"]
  assert summary["accuracy_by_steps"]["1"] == pytest.approx(summary["block_0_accuracy"])


@pytest.mark.slow
def test_exact_chain_tables(tmp_path):
  out = tmp_path / "exact.json"
  run_cli("studies.exact_chain", "--rows=320", f"--out={out}")
  tables = json.loads(out.read_text())
  for row in tables["classification"]:
    assert row["chain_argmax"] <= row["first_call_argmax"] + 0.01
  for row in tables["language"]:
    assert row["first_call_expected"] == pytest.approx(row["entropy"], abs=1e-3)
    assert row["one_chain_argmax"] > 5 * row["entropy"]


@pytest.mark.slow
def test_bench_scaling_counts_collectives_on_fake_devices(tmp_path):
  out = tmp_path / "scaling.json"
  subprocess.run([sys.executable, "-m", "benchmarks.bench_scaling",
                  "--config=experiments/configs/digits.py", "--config.diffusion.num_blocks=2",
                  f"--out={out}", *TINY_FLAGS], cwd=ROOT, check=True, capture_output=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu",
                          XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  summary = json.loads(out.read_text())
  sequential, parallel = summary["rows"]
  assert summary["fake_devices"] and "speedup" not in summary
  assert parallel["mesh"] == "2x2" and parallel["blocks_per_device"] == 1
  assert parallel["collectives_across_blocks"] == 0 < parallel["collectives_within_blocks"]
  # Half of each block's batch per device: less than one device training a block.
  assert parallel["step_memory_mib"] < sequential["step_memory_mib"]


@pytest.mark.slow
def test_compare_trains_both_methods_at_a_matched_budget(tmp_path):
  run_cli("experiments.compare", "--config=experiments/configs/digits.py",
          f"--workdir={tmp_path}", "--config.diffusion.num_blocks=2",
          "--config.train.num_steps=2", "--config.train.progress=False",
          "--config.sample.grid_size=2", "--config.eval.num_samples=20",
          "--config.eval.classifier_steps=5", f"--config.eval.cache_dir={tmp_path / 'cache'}",
          *TINY_FLAGS)
  summary = json.loads((tmp_path / "compare.json").read_text())
  e2e, db = summary["rows"]
  assert (e2e["iterations"], db["iterations"]) == (2, 4)  # B times the iterations
  assert e2e["iterations"] * e2e["layers_per_iteration"] == db["iterations"] * db[
      "layers_per_iteration"]
  assert summary["headline"] == "frechet_distance"
  assert summary["frechet_distance_ratio_db_over_e2e"] == (
      db["frechet_distance"] / e2e["frechet_distance"]) > 0


@pytest.mark.slow
def test_compare_classification_reports_the_accuracy_gap(tmp_path):
  run_cli("experiments.compare", "--config=experiments/configs/classify_digits.py",
          f"--workdir={tmp_path}", "--config.diffusion.num_blocks=2",
          "--config.train.num_steps=2", "--config.train.progress=False",
          "--config.classifier.inference_steps=(1,)", *NETWORK_FLAGS)
  summary = json.loads((tmp_path / "compare.json").read_text())
  e2e, db = summary["rows"]
  assert (e2e["iterations"], db["iterations"]) == (2, 4)
  assert summary["accuracy_e2e_minus_db"] == e2e["accuracy"] - db["accuracy"]
  assert summary["memory_ratio_e2e_over_db"] > 1


@pytest.mark.slow
def test_compare_autoregressive_lm_holds_the_first_call_to_the_target(tmp_path):
  run_cli("experiments.compare", "--config=experiments/configs/shakespeare_ar.py",
          f"--workdir={tmp_path}", "--config.model.num_layers=2",
          "--config.model.hidden_size=16", "--config.model.num_heads=2",
          "--config.model.frequency_dim=16", "--config.diffusion.num_blocks=2",
          "--config.train.num_steps=2", "--config.train.batch_size=4",
          "--config.train.progress=False", "--config.language.seq_len=16",
          "--config.language.num_samples=1", "--config.eval.max_test_examples=4",
          "--config.language.sigma_max_share=0.5")
  summary = json.loads((tmp_path / "compare.json").read_text())
  e2e, db = summary["rows"]
  assert (e2e["iterations"], db["iterations"]) == (2, 4)
  assert summary["bits_per_character_ratio_db_over_e2e"] == (
      db["bits_per_character"] / e2e["bits_per_character"])


@pytest.mark.slow
def test_sweep_trains_each_value(tmp_path):
  run_cli("experiments.sweep", "--config=experiments/configs/digits.py",
          "--field=diffusion.num_blocks", "--values=1,2", f"--workdir={tmp_path}",
          "--config.train.num_steps=2", "--config.train.progress=False",
          "--config.sample.grid_size=2", "--config.eval.num_samples=20",
          "--config.eval.classifier_steps=5", f"--config.eval.cache_dir={tmp_path / 'cache'}",
          *TINY_FLAGS)
  rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
  assert [(r["diffusion.num_blocks"], r["iterations"]) for r in rows] == [("1", 2), ("2", 4)]
  assert rows[1]["step_MiB"] < rows[0]["step_MiB"]


def test_sweep_parses_values_as_the_field_type():
  base = load_config("digits")
  assert with_field(base, "diffusion.num_blocks", "4").diffusion.num_blocks == 4
  assert with_field(base, "diffusion.overlap_gamma", "0").diffusion.overlap_gamma == 0.0
  assert with_field(base, "model.remat", "true").model.remat is True
  assert with_field(base, "diffusion.partition", "uniform_log").diffusion.partition == (
      "uniform_log")
  with pytest.raises(Exception, match="num_blocks=5"):
    with_field(base, "diffusion.num_blocks", "5")  # does not divide 12 layers


@pytest.mark.parametrize("name", ["fashion_mnist", "classify_fashion_mnist", "shakespeare_ar"])
def test_a_benchmark_builds_its_tasks_without_image_data(name, tmp_path):
  """bench_memory and compare profile a config's steps through method_variant: an image
  config needs no data set on disk for that (a text config reads its vocabulary)."""
  config = load_config(name)
  config.data.data_dir = str(tmp_path / "no_data_here")
  for method in ("end_to_end", "diffusion_blocks"):
    resolved, task = method_variant(config, method)
    assert task.num_blocks == (1 if method == "end_to_end" else config.diffusion.num_blocks)
    assert len(task.example_batch(2)) >= 1
  if config.task == "language":
    assert resolved.data.vocab_size > 0


def test_planner_picks_the_smallest_number_of_blocks_that_fits():
  config = tiny_config()  # 4 layers: B in 1, 2, 4
  rows = planning.footprints(config)
  assert [r["num_blocks"] for r in rows] == [1, 2, 4]
  step = {r["num_blocks"]: r["step_bytes"] for r in rows}
  assert step[1] > step[2] > step[4]  # fewer layers per block, less memory
  assert planning.choose(rows, (step[1] + step[2]) // 2) == 2
  assert planning.choose(rows, step[1]) == 1
  with pytest.raises(ConfigError, match=f"smallest step footprint is {step[4]} bytes"):
    planning.choose(rows, step[4] - 1)
  assert planning.parse_bytes("8GiB") == 8 * 2**30
  assert planning.parse_bytes("1.5 MB") == 1_500_000
  with pytest.raises(ConfigError, match="memory budget '8 parsecs' is invalid"):
    planning.parse_bytes("8 parsecs")


@pytest.mark.slow
def test_device_check_runs_on_a_cpu(tmp_path):
  """The accelerator check, at --tiny sizes, so that it is known to work before a GPU
  or TPU ever sees it."""
  out = tmp_path / "check.json"
  result = run_cli("benchmarks.device_check", "--tiny", "--repeats=2", f"--out={out}")
  summary = json.loads(out.read_text())
  assert [(r["method"], r["dtype"]) for r in summary["rows"]] == [
      (method + remat, dtype) for dtype in ("float32", "bfloat16") for remat in ("", "_remat")
      for method in ("end_to_end", "diffusion_blocks")]
  for row in summary["rows"]:
    assert row["step_mib"] > 0 and row["matmul_gflop"] > 0 and row["mfu"] is None  # a CPU
  assert summary["scaling"]["rows"]
  assert [r["way"] for r in summary["transfers"]["rows"]] == [  # this CPU has pinned_host
      "synchronous", "streamed", "streamed_pinned_host", "all_resident"]
  assert "transfers, streamed" in result.stdout
  assert [(r["size"], r["method"], r["dtype"]) for r in summary["authors"]] == [
      ("32x32", "end_to_end", "float32"), ("32x32", "diffusion_blocks", "float32"),
      ("64x64", "end_to_end", "float32"), ("64x64", "diffusion_blocks", "float32"),
      ("64x64", "diffusion_blocks", "bfloat16")]
  assert all(r["step_ms"] > 0 and r["attention"] == "auto" for r in summary["authors"])


def test_device_check_refuses_an_unknown_section_in_one_line(tmp_path):
  result = run_cli("benchmarks.device_check", "--tiny", "--only=steps,speed",
                   f"--out={tmp_path / 'check.json'}", check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: --only=steps,speed: speed is not a section; "
                                   "choose from steps,authors,scaling,transfers")
  assert not (tmp_path / "check.json").exists()


@pytest.mark.slow
def test_bench_scale_splits_a_block_over_fsdp(tmp_path):
  out = tmp_path / "scale.json"
  subprocess.run([sys.executable, "-m", "benchmarks.bench_scale",
                  "--config=experiments/configs/digits.py", "--devices=1,2",
                  "--config.diffusion.num_blocks=2", f"--out={out}", *TINY_FLAGS], cwd=ROOT,
                 check=True, capture_output=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  rows = json.loads(out.read_text())["rows"]
  assert [(r["mode"], r["devices"]) for r in rows] == [
      ("sequential", 1), ("blocks", 1), ("sequential", 2), ("blocks", 2)]
  one, two = rows[0], rows[2]
  assert one["state_bytes_per_device"] == one["state_bytes"]
  # Half, but for the tiny model's copied biases.
  assert two["state_bytes"] / 2 <= two["state_bytes_per_device"] < 0.6 * two["state_bytes"]
  assert two["temp_bytes_per_device"] < one["temp_bytes_per_device"]


@pytest.mark.slow
def test_plan_pod_plans_end_to_end_and_blocks(tmp_path):
  out = tmp_path / "plan.json"
  subprocess.run([sys.executable, "-m", "experiments.plan_pod",
                  "--config=experiments/configs/digits.py", "--devices=4", "--hosts=2",
                  "--device_memory=1GiB", "--blocks=2", "--config.diffusion.num_blocks=2",
                  "--config.parallel.mesh.data=1",
                  "--config.parallel.mesh.fsdp=-1", f"--out={out}", *TINY_FLAGS,
                  # Layers that outweigh the embeddings every block has (at 2 layers of
                  # width 32 a block's step measured 474 against end-to-end's 414 KiB).
                  "--config.model.num_layers=4", "--config.model.hidden_size=64"],
                 cwd=ROOT, check=True, capture_output=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  plan = json.loads(out.read_text())
  e2e, blocks = plan["rows"]
  assert plan["devices"] == 4 and plan["hosts"] == 2
  assert e2e["method"] == "end_to_end" and blocks["num_blocks"] == 2
  assert blocks["device_bytes"] < e2e["device_bytes"] <= 2**30 and e2e["fits"]
  assert blocks["host_bytes"] == blocks["device_state_bytes"] * 2  # 1 waiting, 2 devices


@pytest.mark.slow
def test_bench_transfers_times_every_way_of_moving_blocks(tmp_path):
  out = tmp_path / "transfers.json"
  run_cli("benchmarks.bench_transfers", "--config=experiments/configs/digits.py",
          "--iterations=6", "--repeats=1", "--config.diffusion.num_blocks=2",
          f"--out={out}", *TINY_FLAGS)
  rows = {r["way"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"synchronous", "streamed", "streamed_pinned_host", "all_resident"}
  assert rows["all_resident"]["waiting_share"] == 0
  # One block on the device at a time when moved (and a little), all of them resident.
  assert rows["synchronous"]["blocks_on_device"] < 1.5 < rows["all_resident"]["blocks_on_device"]


@pytest.mark.slow  # eight launches and three short trainings, 100 s
def test_bench_data_measures_memory_against_size_and_read_ahead(tmp_path):
  out = tmp_path / "data.json"
  run_cli("benchmarks.bench_data", "--sizes=60,120", "--text_sizes=1,2", "--steps=3",
          "--repeats=1", f"--scratch={tmp_path / 'scratch'}", f"--out={out}")
  rows = json.loads(out.read_text())
  cases = [(r["case"], r.get("images") or r.get("megabytes")) for r in rows]
  assert cases[:8] == [("train_folder", 60), ("train_folder", 120), ("encode_latents", 60),
                       ("encode_latents", 120), ("tokenize_text", 1), ("tokenize_text", 2),
                       ("train_tokens", 1), ("train_tokens", 2)]
  assert all(r["peak_rss_bytes"] > 2**20 for r in rows[:8])
  assert os.path.getsize(tmp_path / "scratch" / "text_2mb.txt") >= 2 * 10**6
  steps = {r["source"]: r for r in rows if r["case"] == "step_time"}
  assert steps["in RAM"]["against_in_ram"] == 1 and len(steps) == 3
  assert all(r["seconds_per_step"] > 0 for r in steps.values())


@pytest.mark.parametrize("name", ["digits", "fashion_mnist_latent", "classify_fashion_mnist",
                                  "shakespeare_ar", "shakespeare_md4", "shakespeare_recurrent"])
def test_a_measured_config_says_its_command_and_what_it_gave(name):
  """The configs behind the README's rows give their command, and the results file of
  the figure they quote, which exists."""
  import re  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "experiments", "configs", f"{name}.py")) as f:
    docstring = f.read().split('"""')[1]
  assert "python -m experiments." in docstring
  files = re.findall(r"results/([\w.{},-]+\.json)", docstring)
  assert files
  for named in files:
    stem, _, rest = named.partition("{")
    for path in ([named] if not rest else
                 [stem + option + rest.split("}", 1)[1] for option in
                  rest.split("}", 1)[0].split(",")]):
      assert os.path.exists(os.path.join(ROOT, "results", path)), path
