"""notebooks/compare_runs.ipynb runs headless on a tiny sweep made here, so it never rots.

The kernel is this interpreter, registered in a temporary Jupyter path: nothing needs installing
beforehand (a fresh `make test` works)."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from nlcl.config import compose, validate
from nlcl.results import atomic_write_json
from nlcl.runner import run
from tests.test_sweep import sweep_overrides

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "compare_runs.ipynb"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Three real runs (naive with two seeds, replay with one) and a failed record, laid out as a sweep."""
    root = tmp_path_factory.mktemp("nb") / "sweep"
    for job, (strategy, seed) in enumerate([("naive", 0), ("naive", 1), ("replay", 0)]):
        cfg = validate(compose([f"run_dir={root / f'j{job}_{strategy}_s{seed}'}",
                                *sweep_overrides(f"strategy={strategy}", f"seed={seed}")]))
        run(cfg, quiet=True)
    atomic_write_json(root / "j3_ewc_s0" / "results.json", {
        "status": "failed", "error": "RuntimeError: out of memory", "stream": "clinc150", "model": "transformer",
        "strategy": "ewc", "seed": 0})
    return root


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec for this Python in a temporary Jupyter data dir."""
    from ipykernel.kernelspec import install

    install(kernel_name="nlcl-test", prefix=str(tmp_path / "jupyter"), display_name="nlcl test")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return "nlcl-test"


def test_compare_runs_notebook_executes(tiny_sweep, kernel, monkeypatch):
    monkeypatch.setenv("NLCL_SWEEP", str(tiny_sweep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, kernel_name=kernel, timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any cell error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert f"{tiny_sweep}: 3 finished runs, 1 left out" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # final metrics, matrices, forgetting curves, telemetry
    # the comparison table: one row per strategy, naive over two seeds with an interval
    table = next(o["data"]["text/plain"] for o in outputs if "n_seeds" in o.get("data", {}).get("text/plain", ""))
    naive = next(line for line in table.splitlines() if "naive" in line)
    replay = next(line for line in table.splitlines() if "replay" in line)
    assert " 2 " in naive and "±" in naive
    assert " 1 " in replay and "±" not in replay
    assert "out of memory" in text  # the failed run is listed
