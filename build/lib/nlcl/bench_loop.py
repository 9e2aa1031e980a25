"""`nlcl bench loop`: the continual-learning loop's overhead, measured side by side in one process.

Three loops do the same work on the same stream and model (same optimizer steps, same
evaluations of every experience after each one):
  plain      a hand-written PyTorch loop (the floor);
  nlcl       `nlcl.runner.run` (Lightning Trainer per experience, strategies, logging, checkpoints);
  avalanche  avalanche-lib's `Naive` strategy with its evaluation plugin (accuracy only, no loggers).
All three see the same batches (padding columns trimmed per batch). Each is run `--repeats` times,
interleaved; the table reports the median wall time and the ratio to `plain`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nlcl.config import compose, validate
from nlcl.models import build_model
from nlcl.runner import evaluate_all, run, trim_padding
from nlcl.streams import build_stream


def _overrides(args, run_dir) -> list[str]:
    return [f"run_dir={run_dir}", f"task.train_per_class={args.train_per_class}", f"task.test_per_class={args.test_per_class}",
            f"task.max_len={args.max_len}", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
            f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch_size}", "trainer.progress_bar=false",
            "trainer.gradient_clip=null", "logger=csv", "optim=sgd", "optim.lr=0.05", "optim.weight_decay=0.0",
            f"+task.first_experiences={args.experiences}"]


def time_nlcl(args) -> float:
    with tempfile.TemporaryDirectory() as d:
        cfg = validate(compose(_overrides(args, Path(d) / "run")))
        t0 = time.perf_counter()
        run(cfg, quiet=True)
        return time.perf_counter() - t0


def _stream_and_model(args):
    torch.manual_seed(0)
    stream = build_stream("clinc150", max_len=args.max_len, train_per_class=args.train_per_class,
                          test_per_class=args.test_per_class)
    stream.experiences = stream.experiences[: args.experiences]
    model = build_model("transformer", input_kind="tokens", num_classes=stream.num_classes, vocab_size=stream.vocab_size,
                        d_model=args.d_model, n_layers=args.layers, n_heads=4)
    return stream, model


def time_plain(args) -> float:
    stream, model = _stream_and_model(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    class Host:  # evaluate_all only needs .model and .device
        pass

    host = Host()
    host.model, host.device = model, torch.device("cpu")
    t0 = time.perf_counter()
    evaluate_all(host, stream, 512, seen_upto=-1)
    for i, exp in enumerate(stream.experiences):
        mask = torch.zeros(stream.num_classes, dtype=torch.bool)
        mask[stream.classes_seen(i)] = True
        loader = DataLoader(exp.train, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(i), collate_fn=trim_padding(stream.pad_id))
        model.train()
        for _ in range(args.epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x).masked_fill(~mask, -1e9), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        evaluate_all(host, stream, 512, seen_upto=i)
    return time.perf_counter() - t0


def time_avalanche(args) -> float:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    stream, model = _stream_and_model(args)

    def av(ds):
        # same batches as the other loops: padding columns trimmed per batch (avalanche adds task labels)
        trim = trim_padding(stream.pad_id)

        def collate(items):
            x, y = trim([(it[0], it[1]) for it in items])
            return x, y, torch.tensor([it[2] for it in items])

        return _make_taskaware_tensor_classification_dataset(ds.x, ds.y, targets=ds.y.tolist(), task_labels=0,
                                                             collate_fn=collate)

    bench = benchmark_from_datasets(train=[av(e.train) for e in stream.experiences],
                                    test=[av(e.test) for e in stream.experiences])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=torch.nn.CrossEntropyLoss(),
                     train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=512, device="cpu",
                     evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    t0 = time.perf_counter()
    strategy.eval(bench.test_stream)
    for exp in bench.train_stream:
        strategy.train(exp, num_workers=0)
        strategy.eval(bench.test_stream)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nlcl bench loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiences", type=int, default=5)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loops", default="plain,nlcl,avalanche")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    timers = {"plain": time_plain, "nlcl": time_nlcl, "avalanche": time_avalanche}
    times: dict[str, list[float]] = {k: [] for k in args.loops.split(",")}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every loop alike
        for name in times:
            times[name].append(timers[name](args))
            print(f"{name}: {times[name][-1]:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("plain")
    print(f"\n{'loop':<11}{'median s':>10}{'vs plain':>10}   runs")
    for k, v in med.items():
        print(f"{k:<11}{v:>10.2f}{(v / base if base else float('nan')):>10.3f}   {', '.join(f'{t:.2f}' for t in times[k])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "times": times, "median": med}, indent=2))
    return 0
