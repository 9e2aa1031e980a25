"""Run logs that survive a resume: the CSV log is appended to, never truncated.

Lightning's CSV writer deletes `metrics.csv` whenever it is re-created in a folder that already
has one, so every resume or re-run of a run folder used to lose the log of the earlier attempts.
This writer keeps the file: it reads the existing header, appends rows under it, and when new
columns appear rewrites the file atomically (a kill during the rewrite leaves the old file whole).
"""
from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from nlcl.results import atomic_write_text


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning removes the old file here; we adopt it
        path = self.metrics_file_path
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return
        with open(path, newline="") as f:
            self.metrics_keys = next(csv.reader(f), [])
        with open(path, "rb+") as f:  # a kill mid-append may leave a partial last line: end it
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, buf.getvalue())


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger with `_AppendingWriter`: same folder layout, nothing deleted."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
