"""Regenerate docs/results/cms_control from runs/cms_control: nlcl's own report, with the
question and the reading written above it (kept in report_head.md so a regeneration keeps them)."""
import sys
from pathlib import Path

from nlcl import report

if __name__ == "__main__":
    runs, out = sys.argv[1], Path(sys.argv[2])
    report.build_report([runs], out)
    head = (Path(__file__).parent / "report_head.md").read_text()
    body = (out / "report.md").read_text().split("\n", 1)[1]  # drop the generic title
    (out / "report.md").write_text(head + body)
