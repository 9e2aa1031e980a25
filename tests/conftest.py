import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep each test on them without oversubscription
    torch.set_num_threads(2)
    yield


def tiny_overrides(run_dir, *extra):
    """A CLINC150 run small enough for a test: 5 train and 3 test queries per intent, 1-layer model."""
    return [f"run_dir={run_dir}", "task.train_per_class=5", "task.test_per_class=3", "task.max_len=32",
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "trainer.epochs=1",
            "trainer.batch_size=16", "trainer.progress_bar=false", "logger=csv", *extra]
