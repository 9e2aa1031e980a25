"""Verified checkpoints: a checksum travels with every checkpoint and is checked before loading.

File layout: one header line `NLCL-CHECKPOINT 1 <sha256 of payload> <payload bytes>\n`, then the
payload, which is an ordinary `torch.save` archive loaded with `weights_only=True` (no code runs).
A truncated, bit-flipped or foreign file, or one holding pickled code, gives one `CheckpointError`
that names the file and what to do; nothing is loaded from it and nothing is overwritten.
Files written before checksums existed (a bare torch archive) still load, unverified.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import torch

MAGIC = b"NLCL-CHECKPOINT 1 "
ADVICE = ("delete it to start the run again from scratch, or restore a good copy; "
          "nothing in the run folder was changed")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded; the message names the file and what to do."""


def encode(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return MAGIC + f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode() + payload


def _payload(path: Path, data: bytes) -> bytes:
    if not data.startswith(MAGIC):
        if data.startswith(b"PK\x03\x04"):  # a bare torch archive from before checksums
            return data
        raise CheckpointError(f"{path}: not an nlcl checkpoint (no checksum header); {ADVICE}")
    header, nl, payload = data.partition(b"\n")
    try:
        digest, size = header[len(MAGIC):].decode("ascii").split()
        size = int(size)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: corrupt checkpoint header; {ADVICE}") from None
    if not nl or len(payload) != size:
        raise CheckpointError(f"{path}: truncated checkpoint ({len(payload)} of {size} bytes); {ADVICE}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; {ADVICE}")
    return payload


def load(path: str | Path):
    """The checkpoint's object, after its checksum is verified; never executes code from it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    payload = _payload(path, data)
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds pickled code or objects that nlcl never writes; it was refused "
                              f"and must not be loaded with weights_only=False; {ADVICE}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}); {ADVICE}") from None


def require(state, path: Path, keys=("fingerprint", "learner", "R_cil", "R_til", "timings")) -> dict:
    """The keys a resume reads, present with the right kinds (a foreign dict fails here, named)."""
    if not isinstance(state, dict) or any(k not in state for k in keys):
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path}: not an nlcl run checkpoint (missing {missing}); {ADVICE}")
    return state


def ensure_space(folder: Path, model: torch.nn.Module, factor: int = 4) -> None:
    """Refuse before training when the folder's disk cannot take a checkpoint: about `factor` times
    the model's parameters (weights, two optimizer moments, a strategy's copy) and 1 MiB."""
    import errno
    import shutil

    need = factor * sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{folder}: {free / 2**20:.1f} MiB free, a checkpoint needs about "
                      f"{need / 2**20:.1f} MiB; free space or choose another run_dir (nothing was trained)")
