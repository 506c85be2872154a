"""Batches read ahead of the step: the next steps' rows are read and decoded in
background threads while the current step runs.

A batch is a pure function of its step (dbjax.data.batches), so reading ahead changes
no value: `prefetched(read, steps, depth)` yields read(step) for each step in order,
exactly what the loop would read itself, with at most `depth` batches read ahead
(bounded memory). grain's MapDataset does the work (its threads keep the order); grain's
IndexSampler is not used: its shuffle and its split over processes would make a batch
depend on the host count, where dbjax's order depends on (seed, step) alone.
"""
from typing import Callable, Iterable, Iterator

# Batches read ahead where data.prefetch is -1 ("auto") and the devices are accelerators.
AUTO_DEPTH = 2


def depth_for(setting: int, platform: str) -> int:
  """Batches to read ahead: data.prefetch, or for -1 ("auto") AUTO_DEPTH where the
  devices are accelerators, whose host CPUs are free while they compute, and none on
  the CPU backend, where reading threads compete with the step for the same cores
  (measured on 2 cores: 1.36x the in-RAM step time read ahead, 1.15x not;
  benchmarks/bench_data.py)."""
  if setting >= 0:
    return setting
  return 0 if platform == "cpu" else AUTO_DEPTH


def prefetched(read: Callable, steps: Iterable[int], depth: int) -> Iterator:
  """read(step) for each of `steps` in order, up to `depth` of them read ahead in
  background threads (depth 0: read in the calling thread, as each is asked for)."""
  steps = [int(s) for s in steps]
  if depth <= 0 or len(steps) <= 1:
    return (read(step) for step in steps)
  import grain  # pylint: disable=g-import-not-at-top  # only where batches are read ahead
  dataset = grain.MapDataset.source(steps).map(read)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=min(depth, len(steps)), prefetch_buffer_size=depth)))
