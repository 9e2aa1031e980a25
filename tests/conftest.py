import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _few_threads():
    # test models are tiny: one thread is as fast as two and never oversubscribes CI's 2 cores
    torch.set_num_threads(1)
    yield


def tiny_overrides(run_dir, *extra):
    """A CLINC150 run small enough for a test: 5 train and 3 test queries per intent, 1-layer model."""
    return [f"run_dir={run_dir}", "task.train_per_class=10", "task.test_per_class=10", "task.max_len=32",
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "trainer.epochs=3", "optim.lr=3e-3",
            "trainer.batch_size=16", "trainer.progress_bar=false", "logger=csv", *extra]
