"""The multi-frequency optimizer's state under parameter sharding, on torch's fully_shard directly
(FSDP2, 2 CPU processes, gloo), below nlcl run (tests/test_fsdp_run.py runs trainer.strategy=fsdp).

A small Hope (CMS levels of periods 1 and 3) trains 4 steps sharded over 2 ranks, each rank saves
only its shards of the per-level AdamW states, the pending period sums and the step counter
(nlcl.sharding.to_local); a fresh sharded model and optimizer load them and 5 more steps (the
period-3 level steps twice) end bit-identical to the uninterrupted run.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_multi_frequency_state_round_trip(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.fsdp_worker", str(tmp_path)], cwd=REPO,
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print("\n" + "\n".join(json.dumps(r) for r in reports))
    for rep in reports:
        assert rep["slow_levels"] == ["cms1_p3"]
        assert rep["pending_sums_saved"] > 0 and rep["pending_sums_are_sharded"]  # mid-period sums went in
        assert rep["local_shard_numel"] < rep["full_numel"]  # a rank saved its shards, not the model
        assert rep["step_count"] == 9
        assert rep["slow_level_moved_after_resume"] > 0  # the slow level stepped after the resume
        assert rep["max_abs_diff"] == 0.0  # resumed == uninterrupted, bit for bit
