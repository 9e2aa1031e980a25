"""`nlcl run | report | bench`: the command-line entry points.

`nlcl run` is a Hydra application: every argument after `run` is a Hydra override
(`model=hope strategy=replay seed=1`, or `-m` for a sweep).
"""
from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback

# nlcl/conf/hydra/launcher/{joblib,submitit_slurm}.yaml share their names with the plugins' schemas, so
# Hydra validates them against those schemas (what we want) and warns that this is deprecated
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")

EXIT_USAGE = 2  # a bad command line or config: nothing ran
EXIT_DIVERGED = 3  # the run went non-finite: results.json says where (status "diverged")

USAGE = """usage: nlcl <command> [args]

nlcl trains models (Hope, Titans, Transformer++, ...) on continual-learning task streams and
compares them: accuracy matrices, forgetting, mean and 95% CI over seeds.

commands:
  run [OVERRIDES]      train a model on a task stream; arguments are Hydra overrides (group=option,
                       field=value), -m sweeps every combination. `nlcl run --help` lists the groups.
  report PATH...       aggregate runs or sweep folders: table (mean, std, 95% CI, n seeds), report.md,
                       report.csv and plots (nlcl report --help)
  evaluate RUN... task.F=V --name N
                       score finished runs' final models on a changed stream (e.g. longer sequences);
                       `nlcl report` shows the mean as metric eval_<N>
  tokenize OVERRIDES   write a token stream once as token files under +task.token_dir=<folder>;
                       runs with that setting read it from disk lazily (nlcl tokenize --help)
  bench [ARGS]         training throughput of the model families (nlcl bench --help)
  bench loop [ARGS]    overhead of the continual-learning loop vs a plain loop and avalanche-lib
  bench gpu [--dry-run] the GPU speed run in one call: equivalence checks + bench at ~340M, one JSON

examples:
  nlcl run task=banking77 model=transformer strategy=replay seed=1
  nlcl run -m model=transformer,hope strategy=naive,replay seed=0,1,2
  nlcl report multirun/adhoc/<time>

Single runs go to runs/<experiment_name>/, sweeps to multirun/<experiment_name>/<time>/, one folder
per run; add hydra/launcher=joblib to a sweep for parallel local runs, hydra/launcher=submitit_slurm
for a SLURM cluster. notebooks/compare_runs.ipynb shows a sweep's table and plots.
"""


def _finished(run_dir: Path) -> bool:
    import json

    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _hydra_run(argv: list[str]) -> int:
    user_argv = list(argv)
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from nlcl.config import ConfigError, config_dir, validate

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from nlcl.results import atomic_write_json
        from nlcl.runner import run

        from nlcl.divergence import Diverged
        from nlcl.run_lock import RunDirLocked

        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        status = "failed"
        try:
            validate(cfg)
            results = run(cfg)
            return results["metrics"]["acc_final"]
        except KeyboardInterrupt:
            hc = HydraConfig.get()
            _say_interrupted(Path(cfg.run_dir), list(hc.overrides.task), hc.sweep.dir if multirun else None, argv)
            raise SystemExit(130) from None
        except Diverged as e:  # an outcome of the run, recorded like a failure: never a success
            status, failure = "diverged", e
        except RunDirLocked as e:  # the folder is another live run's: write nothing into it
            print(f"nlcl: error: {e}", file=sys.stderr)
            if not multirun:
                raise SystemExit(EXIT_USAGE)
            return None
        except (ConfigError, ValueError, FileNotFoundError) as e:
            if not multirun:
                print(f"nlcl: error: {e}", file=sys.stderr)
                raise SystemExit(EXIT_USAGE)
            failure = e
        except OSError as e:  # read-only folder, full disk...: one line, what was written stays
            if not multirun:
                print(f"nlcl: error: {e}; files already in the run folder were kept", file=sys.stderr)
                raise SystemExit(1)
            failure = e
        except Exception as e:  # noqa: BLE001 - a sweep records a failed run and goes on
            if not multirun:
                raise
            failure = e
        run_dir = Path(cfg.run_dir)
        # a finished result is never replaced by a later failed attempt in the same folder
        record = run_dir / ("failure.json" if _finished(run_dir) else "results.json")
        try:
            _record(record, cfg, status, failure)
        except OSError as e:
            print(f"nlcl: run {run_dir.name} {status}: {failure}; it could not be recorded ({e})", file=sys.stderr)
            return None
        print(f"nlcl: run {run_dir.name} {status}: {failure} (recorded in {record})", file=sys.stderr)
        if not multirun:
            raise SystemExit(EXIT_DIVERGED if status == "diverged" else 1)
        return None

    def _record(record, cfg, status, failure):
        from nlcl.results import atomic_write_json

        atomic_write_json(record, {
            "status": status, "error": f"{type(failure).__name__}: {failure}",
            **({"divergence": failure.info} if status == "diverged" else {"traceback": "".join(traceback.format_exception(failure))}),
            "stream": cfg.task.get("stream"), "model": cfg.model.get("name"),
            "strategy": cfg.strategy.get("name"), "optim": cfg.optim.get("name"),
            "variant": str(cfg.get("variant", "") or ""), "seed": cfg.get("seed"),
            "config": OmegaConf.to_container(cfg, resolve=True)})

    if "--help" in argv or "-h" in argv:  # nlcl's own help screen (nlcl/conf/hydra/help/nlcl.yaml)
        argv = [*argv, "hydra/help=nlcl"]
    elif "-m" in argv or "--multirun" in argv:
        code = _prevalidate_sweep(argv)  # every combination refused or accepted before the first run
        if code is not None:
            return code
        # say where the sweep is and how to report it, and remember how its runs ended
        argv = [*argv, f"+hydra.callbacks.nlcl_summary._target_={__name__}.SweepSummary"]
        SweepSummary.counts = None
        sys.argv = ["nlcl run", *argv]
        app()
        return _sweep_exit_code(SweepSummary.counts)
    else:
        code = _prevalidate(argv)  # a single run and `--cfg job`: refused before Hydra starts the job
        if code is not None:
            return code
        run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")), "")
        if run_dir:  # Hydra's own output folder is the run's folder: no empty runs/adhoc/... left behind
            argv = [*argv, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    from nlcl import distributed

    # Lightning starts the other ranks by re-running sys.argv, which Hydra needs to read "nlcl run":
    # keep the command as typed for that
    distributed.RELAUNCH_ARGV = [sys.argv[0], "run", *user_argv]
    sys.argv = ["nlcl run", *argv]
    app()
    return 0


def _say_interrupted(run_dir: Path, overrides: list[str], sweep_dir: str | None, argv: list[str]) -> None:
    """After Ctrl-C: what is saved, and the command that resumes from it."""
    import shlex

    from nlcl.results import resume_command, safe_torch_load
    from nlcl.runner import STATE_FILE

    state = run_dir / STATE_FILE
    try:
        done = len(safe_torch_load(state)["R_cil"]) - 1
        saved = f"{done} finished experience{'s' * (done != 1)} saved in {state}"
    except (OSError, KeyError, RuntimeError, ValueError):
        saved = "no experience finished yet, nothing to resume from"
    print(f"\n[nlcl] interrupted: {saved}.\n[nlcl] resume this run with:\n  {resume_command(run_dir, overrides)}",
          file=sys.stderr)
    if sweep_dir is not None:  # finished runs of the sweep are reused, unfinished ones resume
        rest = [a for a in argv if not a.startswith(("hydra.sweep.dir=", "+hydra.callbacks."))]
        print(f"[nlcl] or the whole sweep with:\n  nlcl run {' '.join(map(shlex.quote, rest))} "
              f"{shlex.quote(f'hydra.sweep.dir={sweep_dir}')}", file=sys.stderr)


def _overrides_of(argv: list[str]) -> list[str] | None:
    """The Hydra overrides in argv without the flags nlcl knows; None when a flag we leave to Hydra."""
    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--cfg", "-c", "--package", "-p"):
            i += 2
            continue
        if arg in ("--resolve", "-m", "--multirun"):
            i += 1
            continue
        if arg.startswith("-"):
            return None
        overrides.append(arg)
        i += 1
    return overrides


def _refused(jobs: list[tuple[str, list[str]]]) -> int | None:
    """Validate each (label, overrides): first every job without torch or Lightning (fast), then
    against the builders. EXIT_USAGE after printing the first refusal in one line, else None."""
    from nlcl.config import ConfigError, compose

    composed = []
    for stage in ("static", "full"):
        for i, (label, overrides) in enumerate(jobs):
            try:
                if stage == "static":
                    from nlcl.config import validate_static

                    composed.append(validate_static(compose(overrides)))
                else:
                    from nlcl.config import validate  # imports torch and Lightning (the strategies)

                    validate(composed[i])
            except ConfigError as e:
                print(f"nlcl: error: {label}{e}", file=sys.stderr)
                return EXIT_USAGE
    return None


def _prevalidate(argv: list[str]) -> int | None:
    """Compose and validate a single run's overrides as the run will; EXIT_USAGE after printing
    the one-line error, None when the config is good (or uses a Hydra flag we leave to Hydra)."""
    overrides = _overrides_of(argv)
    if overrides is None:
        return None
    if not any(o.startswith("run_dir=") for o in overrides):  # Hydra's folder, made under the current one
        overrides.append(f"run_dir={Path.cwd() / 'runs'}")
    return _refused([("", overrides)])


def sweep_jobs(overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """The overrides of every run a sweep starts, in Hydra's order (its basic sweeper's product of
    the command line's sweeps and of `hydra.sweeper.params` set by an experiment config), and the
    keys that are swept."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from nlcl.config import config_dir

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir())))  # for glob()
    parser = OverridesParser.create(config_loader=loader)
    parsed = parser.parse_overrides(overrides)
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            hydra_cfg = hydra_compose(config_name="config", overrides=jobs[0], return_hydra_config=True).hydra
    except Exception:  # noqa: BLE001 - the first run's config does not compose: nlcl's compose says why
        from nlcl.config import compose

        compose(jobs[0])
        raise
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    if params:  # as the sweeper does: the config's params first, the command line's after them
        parsed = parser.parse_overrides([*params, *overrides])
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    return jobs, {o.get_key_element() for o in parsed if o.is_sweep_override()}


def _prevalidate_sweep(argv: list[str]) -> int | None:
    """Every combination of a sweep composed and validated before the first run starts."""
    from nlcl.config import ConfigError

    overrides = _overrides_of(argv)
    if overrides is None:
        return None
    try:
        jobs, swept = sweep_jobs(overrides)
    except ConfigError as e:  # the first combination does not compose
        print(f"nlcl: error: sweep run 0: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a sweep syntax error: Hydra's own message says what
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"nlcl: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    labelled = []
    for i, job in enumerate(jobs):
        shown = " ".join(o for o in job if o.split("=", 1)[0] in swept)
        if not any(o.startswith("run_dir=") for o in job):  # the sweep folder's parent must be writable
            job = [*job, f"run_dir={Path.cwd() / 'multirun'}"]
        labelled.append((f"sweep run {i} of {len(jobs)}{f' ({shown})' if shown else ''}: ", job))
    return _refused(labelled)


def _sweep_exit_code(counts: dict | None) -> int:
    """0 when at least one run of the sweep finished; otherwise 3 when every run diverged, else 1."""
    if counts is None or counts["finished"] > 0:
        return 0
    return EXIT_DIVERGED if counts["diverged"] and not counts["failed"] else 1


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, count finished and failed runs and name the report command."""

    counts: dict | None = None  # read by _hydra_run for the sweep's exit code (the callback lives in this process)

    def on_multirun_end(self, config, **kwargs) -> None:
        import json

        sweep = Path(config.hydra.sweep.dir)
        status = []
        for f in sorted(sweep.rglob("results.json")):
            try:
                status.append(json.loads(f.read_text()).get("status", "finished"))
            except (OSError, ValueError):
                status.append("unreadable")
        diverged = status.count("diverged")
        failed = len(status) - status.count("finished") - diverged
        SweepSummary.counts = {"finished": status.count("finished"), "failed": failed, "diverged": diverged}
        print(f"\n[nlcl] sweep done: {status.count('finished')} runs finished, {failed} failed, "
              f"{diverged} diverged, in {sweep}/\n"
              f"[nlcl] compare them: nlcl report {sweep}")


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
    if command == "tokenize":
        from nlcl.tokenize import main as tokenize_main

        return tokenize_main(rest)
    if command == "evaluate":
        from nlcl.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "bench":
        if rest[:1] == ["loop"]:
            from nlcl.bench_loop import main as loop_main

            return loop_main(rest[1:])
        if rest[:1] == ["gpu"]:
            from nlcl.bench_gpu import main as gpu_main

            return gpu_main(rest[1:])
        from nlcl.bench import main as bench_main

        return bench_main(rest)
    print(f"nlcl: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
