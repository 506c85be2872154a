"""Metrics reach the JSONL file, TensorBoard event files and the console."""
import json
import os
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dbjax.engine.metric_log import TENSORBOARD_DIR, MetricLog, flatten


def read_scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} as TensorBoard shows them (its own reader, which
  honours a resumed writer's purge_step)."""
  events = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()["scalars"]}


def read_tags(logdir: str) -> dict:
  """TensorBoard's tags of each kind (scalars, images, tensors for text, ...)."""
  events = event_accumulator.EventAccumulator(logdir)
  events.Reload()
  return events.Tags()


ROWS = [{"step": 0, "block": 1, "loss": 2.0, "grad_norm": 0.5},
        {"step": 1, "block": 0, "loss": 3.0, "grad_norm": 0.25},
        {"step": 2, "block": 1, "loss": 1.0, "grad_norm": 0.75}]


def test_rows_go_to_jsonl_tensorboard_and_the_console(tmp_path, capsys):
  log = MetricLog(str(tmp_path), "metrics.jsonl")
  log.write_rows(ROWS)
  log.print_interval(3, 10, ROWS)
  log.write_results(3, {"frechet_distance": 4.5, "per_class": {"0": 0.25}, "kind": "x"})
  log.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line) for line in f] == ROWS
  scalars = read_scalars(str(tmp_path / TENSORBOARD_DIR))
  assert scalars["block_1/loss"] == [(0, 2.0), (2, 1.0)]
  assert scalars["block_0/grad_norm"] == [(1, 0.25)]
  assert scalars["eval/frechet_distance"] == [(3, 4.5)]
  assert scalars["eval/per_class.0"] == [(3, 0.25)]
  assert "eval/kind" not in scalars
  assert "iteration 3/10  loss  block 0: 3  block 1: 1.5" in capsys.readouterr().out


def test_throughput_pictures_and_texts_reach_tensorboard(tmp_path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.imsave(tmp_path / "samples.png", np.zeros((6, 4, 3)))
  log = MetricLog(str(tmp_path), "metrics.jsonl")
  log.write_throughput(10, 10, 2.0, batch_size=32)
  log.write_pictures(10, [str(tmp_path / "samples.png")])
  log.write_text(10, "samples.txt", "ROMEO.")
  log.close()
  scalars = read_scalars(str(tmp_path / TENSORBOARD_DIR))
  assert scalars["throughput/iterations_per_second"] == [(10, 5.0)]
  assert scalars["throughput/examples_per_second"] == [(10, 160.0)]
  tags = read_tags(str(tmp_path / TENSORBOARD_DIR))
  assert tags["images"] == ["images/samples"]
  assert any("samples.txt" in tag for tag in tags["tensors"])


def test_a_disabled_log_writes_nothing(tmp_path):
  log = MetricLog(str(tmp_path), "metrics.jsonl", enabled=False)
  log.write_rows(ROWS)
  log.write_results(3, {"a": 1.0})
  log.close()
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tree,flat", [({"a": {"b": 1, "c": {"d": 2}}, "e": 3},
                                        {"a.b": 1, "a.c.d": 2, "e": 3}), ({}, {})])
def test_flatten(tree, flat):
  assert flatten(tree) == flat


def test_a_run_resumed_within_the_same_second_keeps_the_earlier_rows(tmp_path, monkeypatch):
  """tensorboardX names an event file by the second it opens it: a run stopped and
  resumed within one second (a quick preemption; the fault tests' tiny runs) wrote the
  second file over the first, and TensorBoard lost the rows before the stop."""
  from tensorboardX import event_file_writer
  monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(
      time=lambda: 1_700_000_000.25))  # both writers open their files in one second
  first = MetricLog(str(tmp_path), "metrics.jsonl")
  first.write_rows(ROWS[:2])
  first.close()
  resumed = MetricLog(str(tmp_path), "metrics.jsonl", purge_step=2)
  resumed.write_rows(ROWS[2:])
  resumed.close()
  assert read_scalars(str(tmp_path / TENSORBOARD_DIR))["block_1/loss"] == [(0, 2.0), (2, 1.0)]
