"""Task streams by name. Add a stream by adding its builder to `STREAMS`."""
from __future__ import annotations

from typing import Callable

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .data_files import find_data_file
from .knowledge import knowledge_in_context_stream, knowledge_stream
from .lm_domains import lm_domains_stream
from .synthetic import formal_languages_stream, mad_stream, mqar_stream, niah_stream
from .text import banking77_stream, clinc150_stream
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
}


def build_stream(name: str, **kwargs) -> TaskStream:
    """Build a registered stream; unknown names and options fail with the allowed ones listed."""
    if name not in STREAMS:
        raise StreamError(f"unknown stream '{name}'; allowed: {sorted(STREAMS)}")
    builder = STREAMS[name]
    check_kwargs(builder, kwargs, f"stream '{name}'")
    return builder(**kwargs)


__all__ = [
    "STREAMS", "build_stream", "StreamError", "TaskStream", "Experience", "TensorPairDataset", "find_data_file",
    "Tokenizer", "ByteTokenizer", "BPETokenizer", "build_tokenizer", "gpt2_tokenizer", "train_bpe",
    "clinc150_stream", "banking77_stream", "split_mnist_stream", "permuted_mnist_stream",
]
