"""Reading compiled HLO: which device groups each collective spans. Used by the tests
and benchmarks/bench_scaling.py to show that the parallel step communicates nothing
between blocks."""
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")


def _replica_groups(line: str, num_devices: int) -> list[set[int]]:
  """The device groups of one collective of compiled HLO: listed ({{0,1},{2,3}}) or
  in iota form ([groups,size]<=[dims]T(perm))."""
  listed = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line)
  if listed:
    return [set(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", listed.group(1))]
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if iota:
    groups, size = int(iota.group(1)), int(iota.group(2))
    ids = np.arange(num_devices).reshape([int(d) for d in iota.group(3).split(",")])
    if iota.group(4):
      ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
    return [set(row) for row in ids.reshape(groups, size).tolist()]
  return [set(range(num_devices))]  # no groups: all devices


def collective_groups(hlo_text: str, num_devices: int) -> list[set[int]]:
  """The device groups of every collective in compiled HLO text (compiled.as_text()).
  Device ids are mesh positions: (b, d) is b * data width + d."""
  return [group for line in hlo_text.splitlines()
          if any(re.search(rf"\b{op}(-start)?\(", line) for op in COLLECTIVES)
          for group in _replica_groups(line, num_devices)]


def crosses_blocks(group: set[int], data_width: int) -> bool:
  """Whether a collective's device group spans more than one block's data group."""
  return len({device // data_width for device in group}) > 1
