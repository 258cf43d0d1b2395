"""Prompt data: the built-in synthetic sort task, user dataset loaders and the resumable batch iterator."""

from skyrl_mtp.data.datasets import PromptDataset, load_examples, synthetic_examples
from skyrl_mtp.data.synthetic import (
    SyntheticTask,
    make_split,
    reference_response,
    sft_pairs,
    sort_reward,
)

__all__ = [
    "PromptDataset",
    "SyntheticTask",
    "load_examples",
    "make_split",
    "reference_response",
    "sft_pairs",
    "sort_reward",
    "synthetic_examples",
]
