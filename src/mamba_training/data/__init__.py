"""Data: tokenizers, the bundled corpus, token shards on disk, and the resumable batch sampler.

    tokenizer = load_tokenizer("byte")                       # or a tokenizer.json path
    prepared = resolve_corpus("bundled", "byte", 0.05, ".cache/mamba-training/data")
    train = TokenDataset(prepared, "train")
    sampler = BatchSampler(train, seq_len=128, batch_size=16, seed=1337, rank=0, world_size=1)
    x, y = sampler.next_batch()                               # LongTensors (16, 128)
"""

from mamba_training.data.corpus import bundled_corpus_path, resolve_corpus
from mamba_training.data.dataset import TokenDataset
from mamba_training.data.sampler import BatchSampler, eval_batches
from mamba_training.data.shards import PreparedInfo, ShardInfo, SplitInfo, prepare_corpus, read_meta
from mamba_training.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "HFTokenizer",
    "PreparedInfo",
    "ShardInfo",
    "SplitInfo",
    "TokenDataset",
    "Tokenizer",
    "bundled_corpus_path",
    "eval_batches",
    "load_tokenizer",
    "prepare_corpus",
    "read_meta",
    "resolve_corpus",
]
