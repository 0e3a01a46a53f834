"""Prompt datasets for online objectives (GRPO, DiffusionNFT, online DPO, rejection-SFT), which generate their own
videos.

A prompt file is plain text with one prompt per line; blank lines and lines starting with ``#`` are skipped. A
``.jsonl`` prompt file holds one ``{"prompt": ...}`` object per line instead, and for image-to-video models each may
name its conditioning image, ``{"prompt": ..., "image": "first.png"}`` (relative to the file's folder and inside it,
RGB; every line or none). Images are read as ``[3, H, W]`` in ``[0, 1]``, centre-cropped and resized to ``height`` x
``width`` as the video folder does, or kept at their size (one size for the file) when no size is given; batches
then carry ``"image"`` ``[B, 3, H, W]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.data.video_folder import probe_image, read_image, resize_video, resolve_inside
from lit_videoalign.errors import shorten


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


def read_prompt_manifest(path: str | Path, same_size: bool = True) -> tuple[list[str], list[Path] | None]:
    """The prompts of a JSONL prompt file and their conditioning images (None when no line names one).

    Every image is checked here: inside the file's folder, present and RGB; every line names one or none does; with
    ``same_size`` all have one size (they are batched at their own size). All problems are reported in one error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts, images, problems, sizes = [], [], [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ValueError(f"{where}: expected an object with a non-empty string 'prompt', got {shorten(entry)}")
        prompts.append(entry["prompt"])
        images.append(None)
        if entry.get("image") is None:
            continue
        image = resolve_inside(path.parent, entry["image"], f"{where}: image")  # an escaping path raises at once
        if not image.is_file():
            problems.append(f"{where}: image file {entry['image']!r} not found under {path.parent}")
            continue
        try:
            sizes.setdefault(probe_image(image), where)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        images[-1] = image
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one JSON object per line expected)")
    named = [i for i, e in enumerate(images) if e is not None]
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else f"{len(problems)} conditioning images in {path} cannot "
                         f"be used: " + "; ".join(problems))
    if named and len(named) < len(prompts):
        missing = [i + 1 for i, e in enumerate(images) if e is None][:20]
        raise ValueError(f"{len(named)} of {len(prompts)} prompts in {path} name an 'image' and the others do not "
                         f"(prompts {missing}); give every prompt an image or none")
    if same_size and len(sizes) > 1:
        found = ", ".join(f"{w}x{h} ({where})" for (w, h), where in sizes.items())
        raise ValueError(f"the conditioning images in {path} differ in size ({found}); set height and width to resize "
                         "them")
    return prompts, images if named else None


class PromptDataset(Dataset):
    """A list of prompts as ``{"prompt": str}`` items, with ``"image"`` ``[3, H, W]`` in ``[0, 1]`` when ``images``
    names one file per prompt (resized to ``height`` x ``width`` when given)."""

    def __init__(self, prompts: list[str], images: list[Path] | None = None, height: int | None = None,
                 width: int | None = None) -> None:
        if not prompts:
            raise ValueError("PromptDataset needs at least one prompt")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"PromptDataset needs one image per prompt, got {len(images)} for {len(prompts)}")
        self.prompts, self.images, self.size = list(prompts), images, (height, width)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        item = {"prompt": self.prompts[index]}
        if self.images is not None:
            image = read_image(self.images[index])  # (3, h, w)
            item["image"] = image if self.size[0] is None else resize_video(image[None], *self.size)[0]
        return item


class PromptFileDataModule(L.LightningDataModule):
    """Training (and optional validation) prompts from text files, or from ``.jsonl`` files whose lines may name
    conditioning images (see the module docstring).

    Args:
        train_file: prompts to train on.
        val_file: held-out prompts for validation.
        batch_size: prompts per step (each becomes a group of rollouts in GRPO).
        seed: shuffling seed.
        height: conditioning images are centre-cropped and resized to this height (None: kept at their own size,
            which must then be the model's video size).
        width: see ``height``.
    """

    def __init__(self, train_file: str, val_file: str | None = None, batch_size: int = 4, seed: int = 0,
                 height: int | None = None, width: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if (height is None) != (width is None) or any(s is not None and s < 1 for s in (height, width)):
            raise ValueError(f"give a positive height and width or neither, got height={height}, width={width}")
        self.train_file, self.val_file, self.batch_size, self.seed = train_file, val_file, batch_size, seed
        self.height, self.width = height, width

    def _dataset(self, path: str) -> PromptDataset:
        if Path(path).suffix != ".jsonl":
            return PromptDataset(read_prompt_file(path))
        prompts, images = read_prompt_manifest(path, same_size=self.height is None)
        return PromptDataset(prompts, images, self.height, self.width)

    def setup(self, stage: str) -> None:
        self.train_set = self._dataset(self.train_file)
        self.val_set = self._dataset(self.val_file) if self.val_file else None

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                   generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=self.batch_size)
