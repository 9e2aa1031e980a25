"""`nlcl evaluate RUN_DIR task.FIELD=VALUE ...`: score a finished run's final model on another
version of its stream (longer sequences, another bin, the test split after tuning on validation...).

The model, optimizer and strategy settings come from the run's config.yaml and its final
checkpoint; only `task.*` fields may change. The scores go to RUN_DIR/evaluations/<name>.json and
`nlcl report` shows their mean as the metric `eval_<name>`.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from omegaconf import OmegaConf

NAME = re.compile(r"^[A-Za-z0-9_]+$")


def load_plain_yaml(path: Path):
    """A run's config.yaml as OmegaConf; a file with tags (`!!python/...`) or bad syntax is refused
    in one line, nothing of it is executed."""
    import yaml

    from nlcl.config import ConfigError

    try:
        return OmegaConf.load(path)  # OmegaConf's loader is a safe loader: tags raise, never construct
    except yaml.YAMLError as e:
        problem = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: not plain YAML ({problem}); nlcl reads no tags, nothing was evaluated") from None


def evaluate_run(run_dir: str | Path, overrides: list[str], name: str) -> dict:
    from nlcl.config import ConfigError, validate
    from nlcl.results import atomic_write_json, safe_torch_load
    from nlcl.checkpoint_io import CheckpointError, require
    from nlcl.runner import STATE_FILE, build_parts, config_fingerprint, evaluate_all, quiet_lightning, run_device

    run_dir = Path(run_dir)
    if not NAME.match(name):
        raise ConfigError(f"--name: '{name}' must be letters, digits and underscores")
    for path in (run_dir / "config.yaml", run_dir / "results.json", run_dir / STATE_FILE):
        if not path.exists():
            raise FileNotFoundError(f"nlcl evaluate: '{path}' is missing; is '{run_dir}' a finished nlcl run?")
    for o in overrides:
        key, eq, _ = o.partition("=")
        if not eq or not key.startswith("task.") or key == "task.stream":
            raise ConfigError(f"nlcl evaluate: override '{o}': only task.FIELD=VALUE (not task.stream) may change")
    cfg = load_plain_yaml(run_dir / "config.yaml")
    run_fingerprint = config_fingerprint(cfg)  # the run's own, before the task changes
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    cfg.run_dir = str(run_dir)
    validate(cfg)
    quiet_lightning()
    parts = build_parts(cfg)
    state = require(safe_torch_load(run_dir / STATE_FILE), run_dir / STATE_FILE)  # checksum verified
    if state["fingerprint"] != run_fingerprint:
        raise CheckpointError(f"{run_dir / STATE_FILE}: belongs to another configuration (fingerprint "
                              f"{state['fingerprint']}, config.yaml has {run_fingerprint}); nothing was evaluated")
    if len(state["R_cil"]) - 1 < len(parts.stream):
        raise ValueError(f"nlcl evaluate: '{run_dir}' stopped after {len(state['R_cil']) - 1} of "
                         f"{len(parts.stream)} experiences; finish it first (rerun its command)")
    parts.learner.load_run_state(state["learner"])
    parts.learner.to(run_device(cfg.trainer))
    scores, task_il = evaluate_all(parts.learner, parts.stream, int(cfg.trainer.eval_batch_size),
                                   seen_upto=len(parts.stream) - 1)
    record = {"name": name, "overrides": overrides, "experiences": [e.name for e in parts.stream.experiences],
              "scores": scores, "scores_task_il": task_il, "mean": sum(scores) / len(scores),
              "score_name": parts.stream.metric_name, "higher_is_better": parts.stream.higher_is_better}
    atomic_write_json(run_dir / "evaluations" / f"{name}.json", record)
    return record


def main(argv: list[str]) -> int:
    from nlcl.config import ConfigError

    ap = argparse.ArgumentParser(prog="nlcl evaluate", description=__doc__.split("\n\n")[0],
                                 epilog="e.g. nlcl evaluate runs/x/j0_... task.test_bin=1 --name bin1")
    ap.add_argument("run_dirs", nargs="+", help="finished run folders, then task.FIELD=VALUE overrides")
    ap.add_argument("--name", required=True, help="the evaluation's name: evaluations/<name>.json, metric eval_<name>")
    args = ap.parse_args(argv)
    overrides = [a for a in args.run_dirs if "=" in a]
    run_dirs = [a for a in args.run_dirs if "=" not in a]
    if not run_dirs:
        print("nlcl evaluate: name at least one run folder")
        return 2
    for run_dir in run_dirs:
        try:
            rec = evaluate_run(run_dir, overrides, args.name)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            print(f"nlcl: error: {e}")
            return 2
        print(f"[nlcl] {run_dir}: {args.name} {rec['score_name']} " + " ".join(f"{s:.4f}" for s in rec["scores"])
              + f" (mean {rec['mean']:.4f})")
    return 0
