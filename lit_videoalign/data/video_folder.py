"""Videos and prompts from a folder: ``metadata.jsonl`` with one ``{"file_name": ..., "prompt": ...}`` per line.

This is the layout of the Hugging Face ``videofolder`` convention. Every entry is checked when the dataset is built,
before the first training step: the file lies inside the root, exists, decodes (or, with ``decode_check=False``, has a
readable header and first frame) and holds at least ``num_frames`` frames. All the bad files (missing, empty, truncated,
an image or a text file named ``.mp4``) are reported together in one error, so training never starts on a partial
dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.errors import shorten
from lit_videoalign.video_io import MAX_LISTED, probe_video, read_video


def resolve_inside(root: Path, relative: str, what: str) -> Path:
    """Resolve ``relative`` under ``root`` and refuse anything that escapes it (``..``, absolute paths, links)."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what}: expected a non-empty relative path string, got {shorten(relative)}")
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what}: path {relative!r} escapes the dataset root {root}")
    return path


def resize_video(video: Tensor, height: int, width: int) -> Tensor:
    """Centre-crop ``[T, C, H, W]`` to the target aspect ratio, then resize with antialiasing."""
    _, _, h, w = video.shape
    target = width / height
    if w / h > target:  # too wide
        new_w = round(h * target)
        video = video[..., (w - new_w) // 2:(w - new_w) // 2 + new_w]
    elif w / h < target:  # too tall
        new_h = round(w / target)
        video = video[..., (h - new_h) // 2:(h - new_h) // 2 + new_h, :]
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return video.clamp(0, 1)  # bilinear overshoot only


class VideoFolderDataset(Dataset):
    """Text-video pairs from ``root/metadata.jsonl``.

    Args:
        root: dataset folder.
        num_frames: frames per clip (the first ``num_frames`` of each file; shorter files are an error).
        height: output height.
        width: output width.
        metadata: name of the JSONL manifest inside ``root``.
        decode_check: decode every frame of every file when the dataset is built; False only opens each file, decodes
            its first frame and counts packets (for large datasets; damage later in a stream then fails when read).
    """

    def __init__(self, root: str, num_frames: int, height: int, width: int, metadata: str = "metadata.jsonl",
                 decode_check: bool = True) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.root = Path(root)
        manifest = self.root / metadata
        if not manifest.is_file():
            raise FileNotFoundError(f"no manifest {manifest}; expected JSONL lines like "
                                    '{"file_name": "clip.mp4", "prompt": "..."}')
        self.entries: list[tuple[Path, str]] = []
        problems: list[tuple[str, str, bool]] = []  # (full message, short one for a list, missing?)
        for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{where}: expected an object with 'file_name' and a string 'prompt', "
                                 f"got {shorten(entry)}")
            path = resolve_inside(self.root, entry.get("file_name"), where)
            short = f"line {lineno} ({entry['file_name']})"
            if not path.is_file():
                problems.append((f"{where}: video file {entry['file_name']!r} not found under {self.root}",
                                 f"{short}: not found", True))
                continue
            try:  # before the first step: a file that does not decode would stop training when reached
                frames = probe_video(path, decode=decode_check).num_frames
                if frames < num_frames:
                    raise ValueError(f"video {path} has {frames} frames, expected at least {num_frames}")
            except ValueError as err:
                problems.append((f"{where}: {err}", f"{short}: {str(err).replace(f' {path}', '')}", False))
                continue
            self.entries.append((path, entry["prompt"]))
        if problems:  # all of them at once, so one fix-up pass repairs the dataset
            listed = "; ".join(p[1] for p in problems[:MAX_LISTED])
            more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
            total = len(problems) + len(self.entries)
            message = (problems[0][0] if len(problems) == 1
                       else f"{len(problems)} of {total} videos in {manifest} cannot be used: {listed}{more}")
            raise (FileNotFoundError if all(p[2] for p in problems) else ValueError)(message)
        if not self.entries:
            raise ValueError(f"manifest {manifest} has no entries")
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        path, prompt = self.entries[index]
        video = resize_video(read_video(path, num_frames=self.num_frames), self.height, self.width)
        return {"video": video, "prompt": prompt}


class VideoFolderDataModule(L.LightningDataModule):
    """Serves a :class:`VideoFolderDataset` for training (and an optional second folder for validation).

    Args:
        root: training folder with ``metadata.jsonl``.
        num_frames: frames per clip.
        height: frame height.
        width: frame width.
        batch_size: clips per batch.
        val_root: optional validation folder.
        num_workers: data-loader processes.
        seed: shuffling seed.
        decode_check: decode every video when set up, before the first step (see :class:`VideoFolderDataset`).
        precomputed: a folder written by ``videoalign precompute`` for these videos: batches then carry ``"latents"``
            and the prompts' conditioning instead of ``"video"``, so training runs neither the VAE nor the text
            encoder. The folder must have been encoded at this ``num_frames``/``height``/``width`` by the model's
            backbone (checked when training starts), and hold a ``val`` split when ``val_root`` is set.
    """

    def __init__(self, root: str, num_frames: int, height: int, width: int, batch_size: int = 1,
                 val_root: str | None = None, num_workers: int = 0, seed: int = 0,
                 precomputed: str | None = None, decode_check: bool = True) -> None:
        super().__init__()
        self.root, self.val_root = root, val_root
        self.num_frames, self.height, self.width = num_frames, height, width
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.precomputed, self.decode_check = precomputed, decode_check

    def setup(self, stage: str) -> None:
        if self.precomputed:
            self._setup_precomputed()
            return
        size = (self.num_frames, self.height, self.width)
        self.train_set = VideoFolderDataset(self.root, *size, decode_check=self.decode_check)
        self.val_set = (VideoFolderDataset(self.val_root, *size, decode_check=self.decode_check)
                        if self.val_root else None)

    def _setup_precomputed(self) -> None:
        import warnings

        from lit_videoalign.data.precomputed import PrecomputedDataset, file_sha256

        size = {"num_frames": self.num_frames, "height": self.height, "width": self.width}
        self.train_set = PrecomputedDataset(self.precomputed, "train", **size)
        self.val_set = PrecomputedDataset(self.precomputed, "val", **size) if self.val_root else None
        manifest = Path(self.root) / "metadata.jsonl"
        stored = self.train_set.index["splits"]["train"].get("manifest_sha256")
        if stored and manifest.is_file() and file_sha256(manifest) != stored:
            warnings.warn(f"{manifest} changed since {self.precomputed} was written; training on the precomputed "
                          "examples only. Re-run `videoalign precompute` to include the changes", UserWarning,
                          stacklevel=2)
        backbone = getattr(getattr(self.trainer, "lightning_module", None), "backbone", None)
        if backbone is not None:  # refuse latents and embeddings from another backbone before the first step
            from lit_videoalign.data.encoder_fingerprint import check_backbone

            check_backbone(self.train_set.index, backbone, self.precomputed)

    def _collate(self, dataset):
        return getattr(dataset, "collate", None)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                                   num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                                   drop_last=True, collate_fn=self._collate(self.train_set))

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=self._collate(self.val_set))
