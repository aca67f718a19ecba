"""Data pipeline: Megatron-compatible indexed datasets, GPT samples, blending, samplers and JSONL preprocessing.

Typical use::

    from megatron_hybrid.data import GPTDatasetConfig, build_train_valid_test_datasets, build_pretraining_data_loader
    cfg = GPTDatasetConfig(seq_length=4096, split="99,1,0", eod=tokenizer.eod, return_seq_idx=True)
    train, valid, test = build_train_valid_test_datasets("0.3 data/a_text_document 0.7 data/b_text_document",
                                                         [train_samples, valid_samples, 0], cfg)
    loader = build_pretraining_data_loader(train, consumed_samples, micro_batch_size, dp_rank, dp_size)
"""

from __future__ import annotations

from megatron_hybrid.data.blended_dataset import (
    BlendedDataset,
    build_blending_indices,
    build_exhaustive_blending_indices,
)
from megatron_hybrid.data.builder import build_train_valid_test_datasets, get_size_per_split_per_dataset
from megatron_hybrid.data.gpt_dataset import (
    PAD_TOKEN_ID,
    GPTDataset,
    GPTDatasetConfig,
    build_document_index,
    build_sample_index,
    build_shuffle_index,
    get_ltor_masks_and_position_ids,
)
from megatron_hybrid.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    get_bin_path,
    get_idx_path,
    optimal_dtype,
)
from megatron_hybrid.data.samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
)
from megatron_hybrid.data.utils import Split, parse_data_path, parse_split

__all__ = [
    "DTYPE_CODES",
    "PAD_TOKEN_ID",
    "BlendedDataset",
    "GPTDataset",
    "GPTDatasetConfig",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "MegatronPretrainingRandomSampler",
    "MegatronPretrainingSampler",
    "Split",
    "build_blending_indices",
    "build_document_index",
    "build_exhaustive_blending_indices",
    "build_pretraining_data_loader",
    "build_sample_index",
    "build_shuffle_index",
    "build_train_valid_test_datasets",
    "get_bin_path",
    "get_idx_path",
    "get_ltor_masks_and_position_ids",
    "get_size_per_split_per_dataset",
    "optimal_dtype",
    "parse_data_path",
    "parse_split",
]
