"""Data (design §10): tokenizers, documents (builtin stdlib, text files, jsonl, parquet, `datasets`
directories, prepared ArrayRecord shards) and grain pipelines."""
from stackwise_jax.data.pipeline import DataLoader, make_dataloader
from stackwise_jax.data.tokenizer import (BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE, decode,
                                          encode)

__all__ = ["make_dataloader", "DataLoader", "encode", "decode", "VOCAB_SIZE", "PAD_ID", "MASK_ID",
           "BOS_ID", "EOS_ID"]
