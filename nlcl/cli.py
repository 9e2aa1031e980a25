"""`nlcl run | report | bench`: the command-line entry points.

`nlcl run` is a Hydra application: every argument after `run` is a Hydra override
(`model=hope strategy=replay seed=1`, or `-m` for a sweep).
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

USAGE = """usage: nlcl <command> [args]

commands:
  run [OVERRIDES]      train a model on a task stream (Hydra overrides; -m for a sweep)
                       e.g. nlcl run task=banking77 model=transformer strategy=replay seed=1
                            nlcl run -m model=hope,transformer strategy=naive,ewc,replay seed=0,1,2
  report PATH...       aggregate runs or sweep folders: table (mean, std, 95% CI), markdown, CSV, plots
  bench [ARGS]         training throughput of the model families (nlcl bench --help)
  bench loop [ARGS]    overhead of the continual-learning loop vs a plain loop and avalanche-lib

`nlcl run --help` lists the config groups and their options; results go to runs/ (single runs)
or multirun/ (sweeps), one folder per run.
"""


def _hydra_run(argv: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from nlcl.config import ConfigError, config_dir, validate

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from nlcl.results import atomic_write_json
        from nlcl.runner import run

        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        try:
            validate(cfg)
            results = run(cfg)
            return results["metrics"]["acc_final"]
        except (ConfigError, ValueError, FileNotFoundError) as e:
            if not multirun:
                print(f"nlcl: error: {e}", file=sys.stderr)
                raise SystemExit(2)
            failure = e
        except Exception as e:  # noqa: BLE001 - a sweep records a failed run and goes on
            if not multirun:
                raise
            failure = e
        run_dir = Path(cfg.run_dir)
        atomic_write_json(run_dir / "results.json", {
            "status": "failed", "error": f"{type(failure).__name__}: {failure}",
            "traceback": traceback.format_exc(), "stream": cfg.task.stream, "model": cfg.model.name,
            "strategy": cfg.strategy.name, "seed": int(cfg.seed),
            "config": OmegaConf.to_container(cfg, resolve=True)})
        print(f"nlcl: run {run_dir.name} failed: {failure} (recorded in {run_dir}/results.json)", file=sys.stderr)
        return None

    sys.argv = ["nlcl run", *argv]
    app()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        return _hydra_run(rest)
    if command == "report":
        from nlcl.report import main as report_main

        return report_main(rest)
    if command == "bench":
        if rest[:1] == ["loop"]:
            from nlcl.bench_loop import main as loop_main

            return loop_main(rest[1:])
        from nlcl.bench import main as bench_main

        return bench_main(rest)
    print(f"nlcl: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
