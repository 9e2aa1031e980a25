"""Run a task stream: train on each experience in turn, evaluate every experience after each one.

Data flows one way: config -> stream + model + strategies -> learner -> (this) runner -> metrics
-> results. The runner owns the protocol:
  1. evaluate every experience before any training (row 0 of R, for forward transfer);
  2. for each experience i: seed, train with a fresh Lightning Trainer, evaluate all experiences,
     append row i+1 of R, and save a resumable state atomically;
  3. compute the metrics from R and write the run folder.
A run killed at any point resumes from its last finished experience and ends with the same R,
because every experience starts from a seed that depends only on (seed, i).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from nlcl import distributed as D
from nlcl import metrics as M
from nlcl.checkpoint_io import ensure_space, require
from nlcl.datamodule import ContinualDataModule, default_datamodule, trim_padding  # noqa: F401 (re-exported)
from nlcl.divergence import DivergenceGuard
from nlcl.learner import Learner
from nlcl.models import build_model, count_parameters
from nlcl.models.telemetry import chunking_warnings, collect_mechanism_stats, longest_sequence
from nlcl.optim import build_optimizer
from nlcl.plugins import load_plugins
from nlcl.progress import PlainProgress
from nlcl.run_lock import hold_run_dir
from nlcl.sharding import shard_model
from nlcl.results import (atomic_torch_save, atomic_write_json, atomic_write_text, clean_interrupted_writes,
                          format_matrix, plot_accuracy_matrix, safe_torch_load, write_metrics_csv)
from nlcl.streams import build_stream
from nlcl.streams.base import TaskStream
from nlcl.streams.token_store import stored_stream
from nlcl.strategies import build_strategy

STATE_FILE = Path("checkpoints") / "state.pt"


@dataclass
class RunParts:
    stream: TaskStream
    learner: Learner
    strategies: list = field(default_factory=list)


def _kwargs(node, drop_name: bool = True) -> dict:
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if drop_name:  # model/strategy/optim `name` picks the builder; a task's `name` is a stream option
        d.pop("name", None)
    return d


def build_task_stream(cfg: DictConfig) -> TaskStream:
    """The run's stream from cfg.task, before the run's own cuts (validation split, first experiences).

    With task.token_dir it is tokenised once into token files and read from disk lazily afterwards
    (the same rows, so the same R); `nlcl tokenize` calls this to do that step ahead of a run."""
    task, token_dir = task_options(cfg)
    stream_name = task.pop("stream")

    def build() -> TaskStream:
        return custom_stream(task) if "_target_" in task else build_stream(stream_name, **task)

    return stored_stream({"stream": stream_name, **task}, token_dir, build) if token_dir else build()


def task_options(cfg: DictConfig) -> tuple[dict, str | None]:
    """(the settings that make the stream, task.token_dir): the run's own cuts and the folder left out."""
    task = _kwargs(cfg.task, drop_name=False)
    for key in ("first_experiences", "validation_per_class"):
        task.pop(key, None)
    return task, task.pop("token_dir", None)


def build_parts(cfg: DictConfig) -> RunParts:
    """Everything that can fail on bad input fails here, before any training or writing."""
    load_plugins(cfg.get("plugins"))
    L.seed_everything(int(cfg.seed), workers=False, verbose=False)
    first = cfg.task.get("first_experiences")
    validation = cfg.task.get("validation_per_class")
    stream = build_task_stream(cfg)
    if validation is not None:  # tuning mode: score on held-out training samples, not on test
        stream.hold_out_validation(int(validation), seed=int(cfg.seed))
    if first is not None:  # a quick run on the head of the stream
        if int(first) < 1:
            raise ValueError(f"task.first_experiences: must be >= 1, got {first}")
        stream.experiences = stream.experiences[: int(first)]
    model_kw = _kwargs(cfg.model)
    in_dim = None
    if stream.input_kind == "image":
        in_dim = int(stream.experiences[0].train.x[0].numel())
    model = build_model(cfg.model.name, input_kind=stream.input_kind, num_classes=stream.num_classes,
                        vocab_size=stream.vocab_size, in_dim=in_dim, pad_id=stream.pad_id,
                        task="lm" if stream.objective == "lm" else "classify", **model_kw)
    strategies = [build_strategy(cfg.strategy.get("name"), **_kwargs(cfg.strategy))]
    optim_kw = _kwargs(cfg.optim)

    def make_optimizer(m):
        return build_optimizer(m, cfg.optim.get("name"), **optim_kw)

    sharded = str(cfg.trainer.get("strategy", "auto")) == "fsdp"
    learner = Learner(model, stream.num_classes, make_optimizer, strategies,
                      log_every=int(cfg.trainer.log_every), objective=stream.objective,
                      mask_unseen=bool(cfg.trainer.get("mask_unseen", True)), shard=shard_model if sharded else None)
    # token files on disk recorded their longest row when written; in-memory sets are measured
    lengths = [longest_sequence(e.train.x, stream.pad_id) if isinstance(getattr(e.train, "x", None), torch.Tensor)
               else getattr(e.train, "longest", None) for e in stream.experiences]
    lengths = [n for n in lengths if n is not None]
    if stream.input_kind == "tokens" and lengths:  # self-modification that cannot act is said before training
        longest = max(lengths)
        for message in chunking_warnings(model, longest):
            print(f"[nlcl] WARNING {message}", file=sys.stderr)
    return RunParts(stream, learner, strategies)


def custom_stream(task: dict) -> TaskStream:
    """`task._target_`: a callable returning a TaskStream, called with the task's other fields."""
    from nlcl.plugins import PluginError, call_target

    stream = call_target(task, "task", drop=())
    if not isinstance(stream, TaskStream):
        raise PluginError(f"task._target_: {task['_target_']} returned {type(stream).__name__}, not a "
                          "nlcl.streams.TaskStream")
    return stream.validate()


@torch.no_grad()
def count_correct(model: torch.nn.Module, loader, seen_mask: torch.Tensor, task_classes: list[int],
                  device) -> torch.Tensor:
    """[correct class-IL, correct task-IL, samples] over `loader`: class-IL predicts over every class
    seen so far, task-IL over the experience's own classes, both from the same logits."""
    was_training = model.training
    model.eval()
    task_mask = torch.zeros_like(seen_mask)
    task_mask[task_classes] = True
    correct_cil = torch.zeros((), device=device)
    correct_til = torch.zeros((), device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        correct_cil += (logits.masked_fill(~seen_mask, float("-inf")).argmax(-1) == y).sum()
        correct_til += (logits.masked_fill(~task_mask, float("-inf")).argmax(-1) == y).sum()
        n += len(y)
    model.train(was_training)
    return torch.stack([correct_cil, correct_til, torch.tensor(float(n), device=device)])


def evaluate(model: torch.nn.Module, dataset: Dataset, seen_mask: torch.Tensor, task_classes: list[int],
             batch_size: int, device, pad_id: int = 0) -> tuple[float, float]:
    """Class-IL and task-IL accuracy of `model` on all of `dataset` (one process)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=trim_padding(pad_id))
    c = count_correct(model, loader, seen_mask, task_classes, device)
    return (c[0] / c[2]).item(), (c[1] / c[2]).item()


def evaluate_all(learner: Learner, stream: TaskStream, batch_size: int, seen_upto: int,
                 datamodule: ContinualDataModule | None = None) -> tuple[list, list]:
    """One row of R (class-IL and task-IL). Under several processes each rank counts its share of every
    test set and the counts are summed over the ranks (integers: exact), so every rank gets the same row."""
    device = learner.device
    if stream.scorer is not None:  # e.g. exact match or perplexity; no class-IL/task-IL split
        # stream scorers read whole experiences: every rank scores all of them (same model, same result)
        was_training = learner.model.training
        learner.model.eval()
        with torch.no_grad():
            scores = [float(stream.scorer(learner.model, e)) for e in stream.experiences]
        learner.model.train(was_training)
        return scores, list(scores)
    seen = torch.zeros(stream.num_classes, dtype=torch.bool, device=device)
    if seen_upto < 0:  # before any training nothing is seen: predict over every class
        seen[:] = True
    else:
        seen[stream.classes_seen(seen_upto)] = True
    dm = datamodule or ContinualDataModule(stream, 1, batch_size)
    loaders = dm.test_dataloaders(stream)
    counts = torch.stack([count_correct(learner.model, loader, seen, e.classes, device)
                          for e, loader in zip(stream.experiences, loaders)])
    if learner.sharded:  # every forward of a sharded model gathers its parameters: all ranks run as many
        match_forwards(learner.model, loaders, [e.test for e in stream.experiences], dm.collate(), device)
    D.all_reduce_sum_([counts])
    cil = (counts[:, 0] / counts[:, 2]).tolist()
    til = (counts[:, 1] / counts[:, 2]).tolist()
    return cil, til


@torch.no_grad()
def match_forwards(model: torch.nn.Module, loaders: list, datasets: list, collate, device) -> None:
    """Run stand-in forwards (results unused) until this rank has run as many evaluation batches as
    the rank with the most: the shares of a test set differ by at most one sample, which can still
    make one more batch on some ranks, and a sharded model's forward is a collective."""
    mine = sum(len(loader) for loader in loaders)
    most = max(D.all_gather_objects(mine))
    stand_in = collate([datasets[0][0]])[0].to(device)
    was_training = model.training
    model.eval()
    for _ in range(most - mine):
        model(stand_in)
    model.train(was_training)


class StepEvaluator(L.Callback):
    """Every `every` optimizer steps, evaluate every experience on a fixed subsample of its test set.

    Boundary-only evaluation hides the transient drop on old experiences when a new one starts
    (the stability gap, De Lange et al. 2023); these records show it. Host syncs happen here,
    between steps, never inside forward or backward.
    """

    def __init__(self, stream: TaskStream, every: int, subsample: int, batch_size: int, curves: list, seed: int):
        self.stream, self.every, self.batch_size, self.curves = stream, every, batch_size, curves
        g = torch.Generator().manual_seed(seed)
        self.tests = [e.test.subset(torch.randperm(len(e.test), generator=g)[:subsample]) for e in stream.experiences]

    def on_train_batch_end(self, trainer, learner, outputs, batch, batch_idx):
        step = learner.total_steps + 1  # Lightning runs callbacks before the module's own hook, which counts
        if step % self.every:
            return
        sub = dataclasses.replace(self.stream, experiences=[dataclasses.replace(e, test=t) for e, t
                                                             in zip(self.stream.experiences, self.tests)])
        scores, _ = evaluate_all(learner, sub, self.batch_size, seen_upto=learner.experience)
        self.curves.append({"step": step, "experience": learner.experience, "scores": scores})
        learner.log_metrics({f"curve/score_exp{j}": v for j, v in enumerate(scores)})


# settings that change how a run is watched, never what it learns or the matrix R it reports
NOT_FINGERPRINTED = {"": ("run_dir", "logger", "experiment_name", "variant"),
                     # where a stream's token files live changes nothing they hold (tested: same R)
                     "task": ("token_dir",),
                     "trainer": ("progress_bar", "log_every", "eval_batch_size", "eval_every_n_steps", "eval_subsample",
                                 # how many processes share the work: same batches, same R up to float
                                 # reduction order, so a run may resume on another number of devices
                                 "devices", "num_nodes", "strategy")}


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes the result (not where it is written or how it is watched)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    # fields at their defaults that change nothing: runs from before they existed still resume
    if not d.get("plugins"):
        d.pop("plugins", None)
    if d.get("trainer", {}).get("mask_unseen", True) is True:
        d.get("trainer", {}).pop("mask_unseen", None)
    for section, keys in NOT_FINGERPRINTED.items():
        node = d.get(section, {}) if section else d
        for k in keys:
            node.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    import lightning
    import torchmetrics

    return {"python": sys.version.split()[0], "torch": torch.__version__, "lightning": lightning.__version__,
            "torchmetrics": torchmetrics.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def make_loggers(cfg: DictConfig, run_dir: Path):
    from nlcl.run_logs import AppendingCSVLogger

    loggers = []
    if cfg.logger.get("csv", True):  # appends across resumes (Lightning's own deletes the old log)
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="logs", version=""))
    if cfg.logger.get("wandb", False):
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", cfg.logger.get("wandb_mode", "offline"))
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(project=cfg.logger.get("project", "nlcl"), save_dir=str(run_dir),
                                   name=run_dir.name, offline=os.environ["WANDB_MODE"] == "offline"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


def quiet_lightning() -> None:
    """One Trainer per experience would repeat Lightning's start-up notes ten times; keep warnings."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")  # no validation sets


def run_device(tcfg: DictConfig) -> torch.device:
    """The device a run (and a later `nlcl evaluate` of it) uses, from trainer.accelerator."""
    return torch.device("cuda" if tcfg.accelerator in ("gpu", "cuda") or
                        (tcfg.accelerator == "auto" and torch.cuda.is_available()) else "cpu")


def run(cfg: DictConfig, *, callbacks=(), quiet: bool = False, datamodule=None) -> dict:
    """Run (or resume) the experiment described by `cfg`; returns the results dict.

    `datamodule(stream, cfg, train_transform)` builds the run's `ContinualDataModule` (default:
    `nlcl.datamodule.default_datamodule`); hand in your own factory to change how batches are made.
    A single-process run holds its folder's lock throughout: a second run on the same run_dir is
    refused. (Several ranks all run this function, so there the lock is not taken.)
    """
    world = int(cfg.trainer.get("devices", 1)) * int(cfg.trainer.get("num_nodes", 1))
    if world > 1:
        return _run_locked(cfg, callbacks=callbacks, quiet=quiet, datamodule=datamodule)
    with hold_run_dir(cfg.run_dir):
        clean_interrupted_writes(Path(cfg.run_dir))  # no live writer owns them while we hold the lock
        return _run_locked(cfg, callbacks=callbacks, quiet=quiet, datamodule=datamodule)


def _run_locked(cfg: DictConfig, *, callbacks=(), quiet: bool = False, datamodule=None) -> dict:
    quiet_lightning()
    tcfg = cfg.trainer
    world = int(tcfg.get("devices", 1)) * int(tcfg.get("num_nodes", 1))
    device = run_device(tcfg)
    if world > 1:  # all ranks run this function; rank 0 alone writes files and prints
        fabric = D.start_processes("gpu" if device.type == "cuda" else "cpu", int(tcfg.devices),
                                   int(tcfg.num_nodes), str(tcfg.strategy))
        device = fabric.device
        if D.world_size() != world:
            raise RuntimeError(f"trainer.devices x trainer.num_nodes = {world}, but {D.world_size()} processes started")
        # a run_dir that holds a time stamp may differ by a second between ranks: rank 0's wins
        cfg = cfg.copy()
        cfg.run_dir = D.broadcast_object(str(cfg.run_dir))
        quiet = quiet or not D.is_rank_zero()
    writer = D.is_rank_zero()
    parts = build_parts(cfg)
    stream, learner, strategies = parts.stream, parts.learner, parts.strategies
    datamodule = (datamodule or default_datamodule)(stream, cfg, strategies[0].train_dataset)
    if not isinstance(datamodule, ContinualDataModule):
        raise TypeError(f"datamodule: the factory must return a ContinualDataModule, got {type(datamodule).__name__}")
    run_dir = Path(cfg.run_dir)
    fingerprint = config_fingerprint(cfg)
    state_path = run_dir / STATE_FILE
    say = (lambda *a: None) if quiet else print

    R_cil: list[list[float]] = []
    R_til: list[list[float]] = []
    timings: list[dict] = []
    curves: list[dict] = []
    mechanism: list[dict] = []  # per experience: what the self-modifying layers did while training
    start_exp = 0
    if state_path.exists():
        state = require(safe_torch_load(state_path), state_path)  # checksum verified, keys present
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"run_dir '{run_dir}' holds a run of a different configuration "
                             f"(fingerprint {state['fingerprint']} vs {fingerprint}); choose another run_dir")
        learner.load_run_state(state["learner"])
        R_cil, R_til = state["R_cil"], state["R_til"]
        timings, curves = state["timings"], state.get("curves", [])
        mechanism = state.get("mechanism", [])
        start_exp = len(R_cil) - 1
        say(f"[nlcl] resuming {run_dir} after experience {start_exp - 1} ({start_exp}/{len(stream)} done)")
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_space(run_dir, learner.model)  # a full disk is found now, not after an experience trained
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    learner.to(device)
    if not R_cil:  # the before-training row
        cil, til = evaluate_all(learner, stream, int(tcfg.eval_batch_size), seen_upto=-1, datamodule=datamodule)
        R_cil, R_til = [cil], [til]
    loggers = make_loggers(cfg, run_dir) if writer else []
    n_params = count_parameters(learner.model)
    say(f"[nlcl] {cfg.model.name} ({n_params:,} parameters) x {cfg.strategy.name} on {stream.name} "
        f"({len(stream)} experiences) -> {run_dir}")

    step_eval = []
    if tcfg.get("eval_every_n_steps"):
        step_eval = [StepEvaluator(stream, int(tcfg.eval_every_n_steps), int(tcfg.get("eval_subsample", 100)),
                                   int(tcfg.eval_batch_size), curves, int(cfg.seed))]
    guard = DivergenceGuard(check_every=int(tcfg.log_every))  # non-finite values stop the run
    for i in range(start_exp, len(stream)):
        L.seed_everything(int(cfg.seed) * 1000 + i, workers=False, verbose=False)
        exp = stream.experiences[i]
        learner.start_experience(i, stream.classes_seen(i))
        for s in strategies:
            s.before_experience(learner, stream, i)
        datamodule.set_experience(i)
        train_set = datamodule.train_set()
        t0 = time.perf_counter()
        steps_before = learner.total_steps
        if len(train_set) > 0:
            n_batches = -(-len(train_set) // int(tcfg.batch_size))
            progress = bool(tcfg.progress_bar) and not quiet
            show_bar = progress and sys.stdout.isatty()  # a terminal gets tqdm's bar, a log file plain lines
            bar = ([TQDMProgressBar(refresh_rate=max(1, n_batches // 20))] if show_bar
                   else [PlainProgress(i, exp.name)] if progress else [])
            trainer = L.Trainer(max_epochs=int(tcfg.epochs), accelerator="gpu" if device.type == "cuda" else "cpu",
                                devices=int(tcfg.get("devices", 1)), num_nodes=int(tcfg.get("num_nodes", 1)),
                                strategy=D.trainer_strategy(str(tcfg.get("strategy", "auto")), world),
                                use_distributed_sampler=False,  # the datamodule shards each global batch itself
                                precision=tcfg.precision, logger=loggers or False,
                                callbacks=[*strategies, *step_eval, *bar, *callbacks, guard], enable_checkpointing=False,
                                enable_model_summary=False, num_sanity_val_steps=0,
                                enable_progress_bar=show_bar,
                                gradient_clip_val=tcfg.gradient_clip or None,
                                gradient_clip_algorithm=tcfg.get("gradient_clip_algorithm", "norm"),
                                limit_train_batches=tcfg.get("limit_train_batches") or 1.0,
                                default_root_dir=str(run_dir))
            try:
                trainer.fit(learner, datamodule=datamodule)
            except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1); keep it a KeyboardInterrupt
                if not trainer.interrupted:
                    raise
            if trainer.interrupted:
                raise KeyboardInterrupt(f"training interrupted during experience {i}")
        t1 = time.perf_counter()
        layers = collect_mechanism_stats(learner.model)  # before evaluation and strategies' own passes
        if layers:
            mechanism.append({"experience": i, "layers": layers})
        for s in strategies:
            s.after_experience(learner, stream, i)
        cil, til = evaluate_all(learner, stream, int(tcfg.eval_batch_size), seen_upto=i, datamodule=datamodule)
        t2 = time.perf_counter()
        R_cil.append(cil)
        R_til.append(til)
        timings.append({"experience": i, "train_s": t1 - t0, "eval_s": t2 - t1,
                        "steps": learner.total_steps - steps_before,
                        "train_samples": len(train_set) * int(tcfg.epochs)})
        for lg in loggers:
            lg.log_metrics({f"eval/acc_exp{j}": v for j, v in enumerate(cil)}
                           | {"eval/acc_avg_seen": sum(cil[: i + 1]) / (i + 1), "experience": i},
                           step=learner.total_steps)
        say(f"[nlcl] experience {i} ({exp.name}): trained {learner.total_steps - steps_before} steps in "
            f"{t1 - t0:.1f}s; accuracy on seen experiences {100 * sum(cil[: i + 1]) / (i + 1):.1f}%")
        run_state = learner.run_state()  # a collective under FSDP: every rank takes part
        if writer:
            atomic_torch_save(state_path, {"fingerprint": fingerprint, "learner": run_state,
                                           "R_cil": R_cil, "R_til": R_til, "timings": timings, "curves": curves,
                                           "mechanism": mechanism})
        D.barrier()  # nobody goes on (or is killed) while rank 0 is still writing

    results = finish(cfg, stream, learner, R_cil, R_til, timings, curves, n_params, run_dir, write=writer,
                     mechanism=mechanism)
    for lg in loggers:
        lg.log_metrics({f"final/{k}": v for k, v in results["metrics"].items() if isinstance(v, float)},
                       step=learner.total_steps)
        lg.finalize("success")
    if cfg.logger.get("wandb", False) and writer:
        import wandb

        wandb.finish()
    if not quiet:
        print_summary(results, run_dir)
    return results


def finish(cfg, stream, learner, R_cil, R_til, timings, curves, n_params, run_dir: Path, write: bool = True,
           mechanism: list | None = None) -> dict:
    hib = stream.higher_is_better
    metrics = M.all_metrics(torch.tensor(R_cil), higher_is_better=hib)
    metrics_til = {f"{k}_task_il": v for k, v in M.all_metrics(torch.tensor(R_til), higher_is_better=hib).items()}
    telemetry = {}
    stats = getattr(learner.optimizer, "level_stats", None)
    if stats is not None:
        telemetry = {lvl: {k: float(v) for k, v in d.items()} for lvl, d in stats().items()}
    results = {
        "status": "finished", "stream": stream.name, "model": cfg.model.name, "strategy": cfg.strategy.name,
        "optim": cfg.optim.name, "variant": str(cfg.get("variant", "") or ""), "seed": int(cfg.seed), "n_parameters": n_params,
        "score_name": stream.metric_name, "higher_is_better": hib,
        "accuracy_matrix": R_cil, "accuracy_matrix_task_il": R_til,
        "metrics": {**metrics, **metrics_til},
        "class_names": list(stream.class_names),  # class id -> name, in full
        "experiences": [{"index": e.index, "name": e.name, "classes": list(e.classes),
                         "task_label": e.task_label, "n_train": len(e.train), "n_test": len(e.test)}
                        for e in stream.experiences],
        "timings": {"experiences": timings, "train_s": sum(t["train_s"] for t in timings),
                    "eval_s": sum(t["eval_s"] for t in timings)},
        "total_steps": learner.total_steps, "level_telemetry": telemetry, "curves": curves,
        "mechanism_telemetry": mechanism or [],
        "versions": versions(), "config_fingerprint": config_fingerprint(cfg),
    }
    if not write:
        return results
    atomic_write_json(run_dir / "results.json", results)
    write_metrics_csv(run_dir / "metrics.csv", results["metrics"])
    plot_accuracy_matrix(R_cil, run_dir / "accuracy_matrix.png",
                         title=f"{cfg.model.name} / {cfg.strategy.name} on {stream.name} ({stream.metric_name})",
                         col_labels=[e.name for e in stream.experiences], percent=hib)
    return results


def print_summary(results: dict, run_dir: Path) -> None:
    fraction = results.get("higher_is_better", True)  # accuracies are fractions, shown as %
    scale, unit = (100.0, "%") if fraction else (1.0, "")
    name = results.get("score_name", "accuracy")
    print(f"\n{name} matrix R ({'class-incremental, ' if name == 'accuracy' else ''}{unit or 'raw'}): "
          "rows = trained up to, columns = evaluated on")
    print(format_matrix(results["accuracy_matrix"], col_labels=[e["name"] for e in results["experiences"]], scale=scale))
    keys = ["acc_final", "acc_avg_incremental", "bwt", "fwt", "forgetting_max", "forgetting_first", "learning_accuracy"]
    print("\n" + "  ".join(f"{k}={scale * results['metrics'][k]:.2f}" for k in keys))
    if name == "accuracy":
        print(f"task-IL acc_final={100 * results['metrics']['acc_final_task_il']:.2f}")
    print(f"train {results['timings']['train_s']:.1f}s, eval {results['timings']['eval_s']:.1f}s, "
          f"{results['total_steps']} steps")
    print(f"[nlcl] results in {run_dir}/ (results.json, metrics.csv, accuracy_matrix.png, logs/, wandb/)")
