"""Runs nlcl jobs one after another in this process: `python -m tests.ddp_worker JOBS_JSON`.

With trainer.devices=2 the first run starts a second rank the way Lightning always does (it re-runs
this same command with LOCAL_RANK=1); later jobs reuse both processes and their process group.
A job with "exit_before" ends every rank abruptly (os._exit, no clean-up) when that experience's
training starts: a kill between experiences.
"""
import json
import os
import sys

import lightning as L


class ExitBefore(L.Callback):
    def __init__(self, experience: int):
        self.experience = experience

    def on_train_start(self, trainer, pl_module):
        if pl_module.experience == self.experience:
            sys.stdout.flush()
            os._exit(3)


def main(argv: list[str]) -> None:
    from nlcl.config import compose, validate
    from nlcl.runner import run

    for job in json.loads(argv[0]):
        cfg = validate(compose(job["overrides"]))
        callbacks = [ExitBefore(job["exit_before"])] if job.get("exit_before") is not None else []
        run(cfg, quiet=True, callbacks=callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
