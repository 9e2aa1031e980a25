"""The README's "Your own data", "Your own model" and "Python API" examples, run as written.

Each block marked `<!-- tested: NAME -->` is taken from README.md and run in the example's folder,
in this process (one interpreter start instead of three): a `nlcl ...` command through
`nlcl.cli.main` with the same arguments, `PYTHONPATH=.` as that folder on sys.path, Python blocks
with exec. The data file is the one the README describes (text,label columns).
"""
import csv
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
CLASSES = {"delivery": "where is my parcel", "card": "my card was declined", "refund": "i want my money back",
           "loan": "can i borrow money", "address": "i moved house", "pin": "i forgot my pin"}


def block(name: str) -> str:
    m = re.search(rf"<!-- tested: {name} -->\s*```\w*\n(.*?)```", README, re.S)
    assert m, f"README.md has no block marked 'tested: {name}'"
    return m.group(1)


@pytest.fixture
def folder(tmp_path):
    with open(tmp_path / "my_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for label, text in CLASSES.items():
            w.writerows([f"{text} {k}", label] for k in range(10))
    return tmp_path


@pytest.fixture
def inside(folder, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # nlcl.cli sets sys.argv for Hydra
    return folder


def run_shell_block(name: str, folder: Path, monkeypatch) -> None:
    command = block(name).replace("\\\n", " ").strip()
    assert command.count("\n") == 0, command
    if command.startswith("PYTHONPATH=. "):
        command = command.removeprefix("PYTHONPATH=. ")
        monkeypatch.syspath_prepend(str(folder))
    args = shlex.split(command)
    assert args[0] == "nlcl", command
    from nlcl.cli import main

    assert main(args[1:]) == 0


def _only_result(folder: Path) -> dict:
    found = list((folder / "runs").rglob("results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_your_own_data(inside, monkeypatch, capsys):
    run_shell_block("own-data", inside, monkeypatch)
    out = capsys.readouterr().out
    r = _only_result(inside)
    assert r["status"] == "finished" and r["strategy"] == "replay" and r["stream"] == "files"
    assert [e["name"] for e in r["experiences"]] == ["address+card", "delivery+loan", "pin+refund"]
    assert "e0 = address+card" in out  # names too long for a column are listed in full
    assert "[nlcl] experience 0 (address+card) epoch 1/1: batch" in out  # not a terminal: plain lines


def test_your_own_model(inside, monkeypatch):
    (inside / "my_model.py").write_text(block("own-model-code"))
    run_shell_block("own-model", inside, monkeypatch)
    r = _only_result(inside)
    assert r["status"] == "finished" and r["model"] == "custom"
    assert r["n_parameters"] == 259 * 32 + 32 * 6 + 6  # byte embedding + nlcl's head on d_model=32


def test_python_api(inside, capsys):
    exec(compile(block("python-api"), "README.md", "exec"), {})
    acc = float(capsys.readouterr().out.strip().splitlines()[-1])
    r = json.loads((inside / "runs" / "api_demo" / "results.json").read_text())
    assert r["metrics"]["acc_final"] == pytest.approx(acc) and 0 <= acc <= 1
