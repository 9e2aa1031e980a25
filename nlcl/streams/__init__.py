"""Task streams by name (`task.stream`). A user's own stream needs no entry here: `task=files` reads
tables and image folders, and `task._target_=my_module.my_stream` builds any TaskStream (docs/plugins.md)."""
from __future__ import annotations

from typing import Callable

from .adapters import avalanche_stream, from_avalanche, hf_stream
from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .data_files import find_data_file
from .files import files_stream, image_folder_stream, read_table, table_stream
from .knowledge import knowledge_in_context_stream, knowledge_stream
from .lm_domains import lm_domains_stream
from .synthetic import formal_languages_stream, mad_stream, mqar_stream, niah_stream
from .text import banking77_stream, clinc150_stream
from .token_files import token_files_stream
from .tokenizers import (BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer, check_kwargs, gpt2_tokenizer,
                         train_bpe)
from .vision import permuted_mnist_stream, split_mnist_stream

STREAMS: dict[str, Callable[..., TaskStream]] = {
    "clinc150": clinc150_stream,
    "banking77": banking77_stream,
    "split_mnist": split_mnist_stream,
    "permuted_mnist": permuted_mnist_stream,
    "knowledge": knowledge_stream,
    "knowledge_in_context": knowledge_in_context_stream,
    "lm_domains": lm_domains_stream,
    "niah": niah_stream,
    "mqar": mqar_stream,
    "formal_languages": formal_languages_stream,
    "mad": mad_stream,
    "files": files_stream,
    "image_folder": image_folder_stream,
    "huggingface": hf_stream,
    "avalanche": avalanche_stream,
    "token_files": token_files_stream,
}


def build_stream(stream: str, /, **kwargs) -> TaskStream:
    """Build a registered stream; unknown names and options fail with the allowed ones listed.
    (`stream` is positional-only: `name` is an option of some streams.)"""
    if stream not in STREAMS:
        raise StreamError(f"unknown stream '{stream}'; allowed: {sorted(STREAMS)}")
    builder = STREAMS[stream]
    check_kwargs(builder, kwargs, f"stream '{stream}'")
    return builder(**kwargs)


__all__ = [
    "STREAMS", "build_stream", "StreamError", "TaskStream", "Experience", "TensorPairDataset", "find_data_file",
    "Tokenizer", "ByteTokenizer", "BPETokenizer", "build_tokenizer", "gpt2_tokenizer", "train_bpe",
    "clinc150_stream", "banking77_stream", "split_mnist_stream", "permuted_mnist_stream",
    "files_stream", "image_folder_stream", "table_stream", "read_table", "hf_stream", "from_avalanche",
    "avalanche_stream",
]
