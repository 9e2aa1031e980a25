"""Runs nlcl jobs one after another in this process: `python -m tests.ddp_worker JOBS_JSON`.

With trainer.devices=2 the first run starts a second rank the way Lightning always does (it re-runs
this same command with LOCAL_RANK=1); later jobs reuse both processes and their process group.
A job with "exit_before" ends every rank abruptly (os._exit, no clean-up) when that experience's
training starts: a kill between experiences. A job with "poison": [rank, step] makes that rank
alone see a NaN loss at that step (the divergence guard must stop every rank, and none may hang).
"""
import json
import os
import sys
from pathlib import Path

import lightning as L


class ExitBefore(L.Callback):
    def __init__(self, experience: int):
        self.experience = experience

    def on_train_start(self, trainer, pl_module):
        if pl_module.experience == self.experience:
            sys.stdout.flush()
            os._exit(3)


class PoisonLossRecord(L.Callback):
    """On one rank, at one step, make the divergence guard read a NaN task loss (the loss that is
    trained on stays finite): a value that went non-finite on that rank only."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the guard's hook
        import torch

        if trainer.global_rank == self.rank and pl_module.total_steps + 1 == self.step:
            pl_module.loss_terms = {**pl_module.loss_terms, "task": torch.tensor(float("nan"))}


def main(argv: list[str]) -> None:
    from nlcl.config import compose, validate
    from nlcl.divergence import Diverged
    from nlcl.runner import run

    for job in json.loads(argv[0]):
        cfg = validate(compose(job["overrides"]))
        callbacks = [ExitBefore(job["exit_before"])] if job.get("exit_before") is not None else []
        if job.get("poison") is not None:
            callbacks.append(PoisonLossRecord(*job["poison"]))
        try:
            run(cfg, quiet=True, callbacks=callbacks)
        except Diverged as e:  # every rank writes what it stopped on, then ends as the CLI would
            rank = os.environ.get("LOCAL_RANK", "0")
            Path(f"{cfg.run_dir}.diverged.rank{rank}.json").write_text(json.dumps(e.info))
            sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])
