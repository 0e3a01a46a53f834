"""Prompt datasets for online objectives (GRPO, online DPO), which generate their own videos.

A prompt file is plain text with one prompt per line; blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line; raises if the file is missing or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts


class PromptDataset(Dataset):
    """A list of prompts as ``{"prompt": str}`` items."""

    def __init__(self, prompts: list[str]) -> None:
        if not prompts:
            raise ValueError("PromptDataset needs at least one prompt")
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"prompt": self.prompts[index]}


class PromptFileDataModule(L.LightningDataModule):
    """Training (and optional validation) prompts from text files.

    Args:
        train_file: prompts to train on.
        val_file: held-out prompts for validation.
        batch_size: prompts per step (each becomes a group of rollouts in GRPO).
        seed: shuffling seed.
    """

    def __init__(self, train_file: str, val_file: str | None = None, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.train_file, self.val_file, self.batch_size, self.seed = train_file, val_file, batch_size, seed

    def setup(self, stage: str) -> None:
        self.train_set = PromptDataset(read_prompt_file(self.train_file))
        self.val_set = PromptDataset(read_prompt_file(self.val_file)) if self.val_file else None

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                   generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=self.batch_size)
