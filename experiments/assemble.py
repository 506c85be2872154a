r"""Assemble one run from block jobs that trained in separate workdirs (docs/design.md,
"Blocks as separate jobs"), then evaluate it as the run's last job would have (metrics.json,
loss_curves.png and the task's pictures or texts):

  python -m experiments.assemble --workdir=runs/digits --from=runs/job0,runs/job1,runs/job2

The jobs must share one config (the first field that differs is named); every block
must be at its end in one of them. With --from left out, the block jobs in --workdir
itself are assembled (as the last job does when it finishes).
"""
import json

from absl import flags

from dbjax.train import assemble_run, saved_config, train_and_evaluate
from experiments.cli import run

_WORKDIR = flags.DEFINE_string("workdir", None, "where the assembled run is written")
_FROM = flags.DEFINE_list("from", None, "the block jobs' workdirs (default: --workdir)")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "evaluate the assembled run")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  assemble_run(_WORKDIR.value, _FROM.value or [_WORKDIR.value])
  if _EVALUATE.value:  # the complete run: train_and_evaluate resumes it at its end
    print(json.dumps(train_and_evaluate(saved_config(_WORKDIR.value), _WORKDIR.value),
                     indent=2))


if __name__ == "__main__":
  run(main)
