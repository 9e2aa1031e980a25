"""`nlcl tokenize OVERRIDES`: the tokenise step of task.token_dir, ahead of any run.

It builds the task's stream once and writes it as token files under task.token_dir (the same
folder a run with those task settings opens), then prints the folder and its size. Runs given the
same task settings and `+task.token_dir` read it from disk lazily instead of building the stream.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

USAGE = """usage: nlcl tokenize task=<stream> [task.F=V ...] +task.token_dir=<folder>

Builds the stream once and writes its token files to <folder>/<stream>-<hash of the task settings>/;
a later `nlcl run` with the same task settings and +task.token_dir=<folder> trains from those files,
read lazily (the corpus never sits in memory) with the same results as the in-memory stream.
Language-modelling token streams only (lm_domains, knowledge, knowledge_in_context, niah, mqar,
formal_languages, mad). For a text corpus of your own use task=token_files and its tokenise step
(nlcl.streams.token_files.tokenize_text_file), which streams the text in chunks.
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    from nlcl.config import ConfigError, compose, validate
    from nlcl.plugins import load_plugins
    from nlcl.runner import build_task_stream, task_options
    from nlcl.streams import StreamError
    from nlcl.streams.token_store import folder_size, store_key

    try:
        with tempfile.TemporaryDirectory() as scratch:  # validation wants a run_dir; nothing is written there
            cfg = validate(compose([f"run_dir={scratch}/unused", *argv]))
        token_dir = cfg.task.get("token_dir")
        if not token_dir:
            raise ConfigError("task.token_dir: missing; give the folder with +task.token_dir=<folder>")
        load_plugins(cfg.get("plugins"))
        stream = build_task_stream(cfg)
    except (ConfigError, StreamError) as e:
        print(f"nlcl tokenize: {e}", file=sys.stderr)
        return 2
    task, _ = task_options(cfg)
    folder = Path(token_dir).expanduser() / store_key(task)
    rows = sum(len(getattr(e, s)) for e in stream.experiences for s in ("train", "test"))
    print(f"[nlcl] {stream.name}: {len(stream)} experiences, {rows:,} train + test rows, "
          f"{folder_size(folder) / 2**20:.1f} MiB of token files in {folder}")
    return 0
