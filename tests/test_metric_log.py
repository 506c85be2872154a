"""Metrics reach the JSONL file, TensorBoard event files and the console."""
import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from dbjax.engine.metric_log import TENSORBOARD_DIR, MetricLog, flatten


def read_scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} from TensorBoard event files (TFRecord framing: length,
  its CRC, the Event proto, its CRC)."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      length, = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


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
