"""`nlcl report` on synthetic run folders: aggregation against hand computation, runs left out,
configurations kept apart, files and plots written."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from nlcl.report import (aggregate, build_report, fig_forgetting_curves, load_runs, main, mean_std_ci,
                         summary_table, t_critical_95)

# two-sided 95% Student-t critical values from a printed table (dof 1, 2, 4)
T_TABLE = {2: 12.706204736174705, 3: 4.302652729911275, 5: 2.7764451051977987}
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, *, model="transformer", strategy="naive", seed=0, acc_final=0.5, status="finished",
              stream="clinc150", score_name="accuracy", settings=None, R=None, **extra):
    folder.mkdir(parents=True)
    R = R if R is not None else [[0.1, 0.0], [0.8, 0.0], [acc_final, 0.7]]
    res = {"status": status, "stream": stream, "model": model, "strategy": strategy, "optim": "adamw",
           "variant": "", "seed": seed, "score_name": score_name, "higher_is_better": score_name != "perplexity",
           "accuracy_matrix": R, "experiences": [{"name": "banking"}, {"name": "travel"}],
           "metrics": {"acc_final": acc_final, "bwt": acc_final - 0.8, "forgetting_max": 0.8 - acc_final},
           "timings": {"train_s": 2.0 + seed}, "level_telemetry": {}, "curves": [], **extra}
    if status == "failed":
        res = {k: res[k] for k in ("status", "stream", "model", "strategy", "seed")} | {"error": "ValueError: boom"}
    (folder / "results.json").write_text(json.dumps(res))
    config = {"seed": seed, "run_dir": str(folder), "task": {"stream": stream, "max_len": 32},
              "model": {"name": model, "d_model": 32}, "optim": {"name": "adamw", "lr": 0.001}, **(settings or {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for i, acc in enumerate([0.50, 0.60, 0.70]):
        write_run(root / f"j{i}_naive_s{i}", seed=i, acc_final=acc)
    for i, acc in enumerate([0.80, 0.90]):
        write_run(root / f"j{3 + i}_replay_s{i}", strategy="replay", seed=i, acc_final=acc,
                  level_telemetry={"level0": {"updates": 10 * (i + 1), "grad_norm": 1.0, "update_norm": 0.1},
                                   "level1": {"updates": 2.0, "grad_norm": 0.5, "update_norm": 0.2}})
    write_run(root / "j5_ewc_s0", strategy="ewc", seed=0, acc_final=0.4)
    write_run(root / "j6_ewc_s1", strategy="ewc", seed=1, status="failed")
    (root / "j7_lwf_s0" / ".hydra").mkdir(parents=True)  # started, killed before results.json
    return root


def test_t_critical_values_match_the_table():
    for n, t in T_TABLE.items():
        assert t_critical_95(n) == pytest.approx(t, rel=1e-9)
    assert math.isnan(t_critical_95(1))


def test_mean_std_ci_by_hand():
    mean, std, ci, n = mean_std_ci([0.5, 0.6, 0.7, float("nan")])
    assert n == 3 and mean == pytest.approx(0.6)
    assert std == pytest.approx(math.sqrt(((0.1) ** 2 + 0 + 0.1 ** 2) / 2))  # n-1 in the denominator
    assert ci == pytest.approx(T_TABLE[3] * 0.1 / math.sqrt(3))
    mean, std, ci, n = mean_std_ci([0.3])
    assert (mean, n) == (0.3, 1) and math.isnan(std) and math.isnan(ci)


def test_aggregate_against_hand_computation(sweep):
    runs, left_out = load_runs([sweep])
    agg = aggregate(runs).set_index("strategy")
    assert list(agg.index) == ["ewc", "naive", "replay"]
    assert agg.loc["naive", "n_seeds"] == 3 and agg.loc["naive", "seeds"] == "0 1 2"
    assert agg.loc["naive", "acc_final_mean"] == pytest.approx(0.6)
    assert agg.loc["naive", "acc_final_std"] == pytest.approx(0.1)
    assert agg.loc["naive", "acc_final_ci95"] == pytest.approx(T_TABLE[3] * 0.1 / math.sqrt(3))
    assert agg.loc["replay", "acc_final_mean"] == pytest.approx(0.85)
    assert agg.loc["replay", "acc_final_ci95"] == pytest.approx(T_TABLE[2] * math.sqrt(0.005) / math.sqrt(2))
    assert agg.loc["replay", "forgetting_max_mean"] == pytest.approx(-0.05)
    assert agg.loc["replay", "train_s_mean"] == pytest.approx(2.5)
    assert agg.loc["ewc", "n_seeds"] == 1 and math.isnan(agg.loc["ewc", "acc_final_ci95"])  # the failed seed is out
    assert math.isnan(agg.loc["naive", "acc_avg_incremental_mean"])  # a metric no run has


def test_summary_table_shows_percent_with_interval(sweep):
    table = summary_table(aggregate(load_runs([sweep])[0]), ["acc_final"]).set_index("config")
    ci = 100 * T_TABLE[3] * 0.1 / math.sqrt(3)
    assert table.loc["naive", "acc_final"] == f"60.00 ± {ci:.2f}"
    assert table.loc["ewc", "acc_final"] == "40.00"  # one seed: no interval


def test_failed_incomplete_and_duplicate_runs_are_left_out_and_listed(sweep, tmp_path):
    copy = tmp_path / "other"
    write_run(copy / "again", seed=0, acc_final=0.99)  # same configuration and seed as j0 in `sweep`
    runs, left_out = load_runs([sweep, copy])
    status = sorted((r["status"], r["run_dir"].split("/")[-1]) for r in left_out)
    assert status == [("duplicate", "again"), ("failed", "j6_ewc_s1"), ("incomplete", "j7_lwf_s0")]
    rep = build_report([sweep, copy], out=tmp_path / "out", plots=False)
    assert rep.agg.set_index("strategy").loc["naive", "acc_final_mean"] == pytest.approx(0.6)  # 0.99 not counted
    md = rep.markdown
    assert "1 failed" in md and "j6_ewc_s1" in md and "ValueError: boom" in md
    assert "incomplete" in md and "j7_lwf_s0" in md and "duplicate" in md


def test_runs_that_differ_beyond_their_names_are_different_configurations(tmp_path):
    root = tmp_path / "lr_sweep"
    for seed in (0, 1):
        for lr, acc in ((0.001, 0.5), (0.01, 0.9)):
            write_run(root / f"lr{lr}_s{seed}", seed=seed, acc_final=acc + seed / 10,
                      settings={"optim": {"name": "adamw", "lr": lr}})
    agg = aggregate(load_runs([root])[0]).set_index("config")
    assert sorted(agg.index) == ["transformer/naive optim.lr=0.001", "transformer/naive optim.lr=0.01"]
    assert agg.loc["transformer/naive optim.lr=0.01", "acc_final_mean"] == pytest.approx(0.95)
    assert (agg["n_seeds"] == 2).all()


def test_perplexity_is_not_shown_in_percent(tmp_path):
    root = tmp_path / "lm"
    for seed, ppl in ((0, 30.0), (1, 40.0)):
        write_run(root / f"s{seed}", seed=seed, stream="lm_domains", score_name="perplexity", acc_final=ppl,
                  R=[[300.0, 310.0], [20.0, 200.0], [ppl, 25.0]])
    table = summary_table(aggregate(load_runs([root])[0]), ["acc_final"])
    assert table.loc[0, "acc_final"].startswith("35.00 ± ")


def test_report_writes_markdown_csv_and_non_empty_plots(sweep, tmp_path):
    out = tmp_path / "report"
    rep = build_report([sweep], out=out)
    names = {p.name for p in rep.files}
    assert {"report.md", "report.csv", "runs.csv", "final_metrics.png", "accuracy_matrices.png",
            "forgetting_curves.png", "level_telemetry.png"} <= names
    for p in rep.files:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000, p  # a drawn figure, not a blank
    csv = pd.read_csv(out / "report.csv").set_index("strategy")
    assert csv.loc["naive", "acc_final_mean"] == pytest.approx(0.6)
    assert csv.loc["naive", "acc_final_ci95"] == pytest.approx(T_TABLE[3] * 0.1 / math.sqrt(3))
    assert csv.loc["naive", "n_seeds"] == 3
    assert len(pd.read_csv(out / "runs.csv")) == 6 + 2  # 6 finished + failed + incomplete
    md = (out / "report.md").read_text()
    assert "| config | n_seeds | acc_final" in md and "![final_metrics](final_metrics.png)" in md
    # mean accuracy matrix of naive: rows init / after e0 / after e1, last row mean of 0.5, 0.6, 0.7
    assert "after e1      60.0    70.0" in md
    # per-level telemetry: replay's level0 updates are 10 and 20 -> mean 15
    assert "| replay | level0 | 15 |" in md


def test_forgetting_curves_use_step_curves_when_present(tmp_path):
    root = tmp_path / "curves"
    for seed in (0, 1):
        curves = [{"step": s, "experience": 0 if s < 20 else 1, "scores": [0.1 * k + seed / 10, 0.05 * k]}
                  for k, s in enumerate((0, 10, 20, 30))]
        write_run(root / f"s{seed}", seed=seed, curves=curves)
    fig = fig_forgetting_curves(load_runs([root])[0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step"
    e0 = ax.lines[0]
    assert list(e0.get_xdata()) == [0, 10, 20, 30]
    # mean over the two seeds, in %: 100 * (0.1 k + 0.05)
    assert np.allclose(e0.get_ydata(), [100 * (0.1 * k + 0.05) for k in range(4)])
    assert any(line.get_xdata()[0] == 20 for line in ax.lines[2:])  # experience boundary marked


def test_forgetting_curves_from_matrices_without_curves(sweep):
    fig = fig_forgetting_curves(load_runs([sweep])[0])
    naive = next(ax for ax in fig.axes if ax.get_title().startswith("naive"))
    e0 = naive.lines[0]  # experience 0 after training on 0 and on 1: 80 and mean(50, 60, 70)
    assert list(e0.get_xdata()) == [0, 1] and np.allclose(e0.get_ydata(), [80.0, 60.0])


def test_cli_prints_the_table_and_fails_cleanly(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--no-plots", "--metrics", "acc_final,bwt"]) == 0
    text = capsys.readouterr().out
    assert "naive" in text and "60.00 ±" in text and "left out (failed)" in text
    assert not (tmp_path / "r" / "final_metrics.png").exists()
    assert main([str(tmp_path / "nowhere")]) == 2
    empty = tmp_path / "empty"
    write_run(empty / "x", status="failed")
    assert main([str(empty)]) == 2
    assert "no finished runs" in capsys.readouterr().out


def test_a_strategys_own_options_only_label_runs_of_that_strategy(tmp_path):
    root = tmp_path / "mixed"
    write_run(root / "naive", settings={"strategy": {"name": "naive"}})
    for mem in (100, 500):
        write_run(root / f"replay{mem}", strategy="replay", settings={"strategy": {"name": "replay", "mem_size": mem}})
    labels = sorted(aggregate(load_runs([root])[0])["config"])
    assert labels == ["naive", "replay strategy.mem_size=100", "replay strategy.mem_size=500"]
