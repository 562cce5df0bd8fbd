"""Data pipeline: corpora, tokenizers, token shards and batch sampling."""

from normlab.data.corpus import default_corpus_text, iter_chunks, iter_texts
from normlab.data.shards import (
    BatchSampler,
    TokenShards,
    eval_batches,
    prepare,
    prepare_or_load,
    read_meta,
    unigram_loss,
)
from normlab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "TokenShards",
    "Tokenizer",
    "default_corpus_text",
    "eval_batches",
    "iter_chunks",
    "iter_texts",
    "load_tokenizer",
    "prepare",
    "prepare_or_load",
    "read_meta",
    "train_bpe",
    "unigram_loss",
]
