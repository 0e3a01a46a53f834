"""Videos and prompts from a folder: ``metadata.jsonl`` with one ``{"file_name": ..., "prompt": ...}`` per line.

This is the layout of the Hugging Face ``videofolder`` convention. Every entry is checked when the dataset is built,
before the first training step: the file lies inside the root, exists, decodes (or, with ``decode_check=False``, has a
readable header and first frame) and holds at least ``num_frames`` frames. All the bad files (missing, empty, truncated,
an image or a text file named ``.mp4``) are reported together in one error, so training never starts on a partial
dataset.

For image-to-video models an entry may name its conditioning image, ``{"file_name": ..., "prompt": ...,
"image": "first.png"}`` (inside the root, RGB; every entry or none), or ``first_frame_image=True`` conditions each clip
on its own first frame. Images are centre-cropped to the clip's aspect ratio and resized as the clips are (a warning
counts the cropped ones); batches then carry ``"image"`` ``[B, 3, H, W]`` in ``[0, 1]``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.errors import UsageError, shorten
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


def probe_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an RGB image file; a clear error for one that does not decode or is not RGB."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise ValueError(f"image {path} does not decode as an image ({type(err).__name__}: {err})") from err
    if mode != "RGB":
        kind = {"L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA", "P": "palette", "I;16": "16-bit "
                "grayscale", "CMYK": "CMYK"}.get(mode, f"mode {mode!r}")
        raise ValueError(f"image {path} is {kind}; conditioning images must be RGB (convert it, e.g. "
                         "PIL's image.convert('RGB'), choosing what an alpha channel becomes)")
    return size


def read_image(path: Path) -> Tensor:
    """An RGB image file as ``[3, H, W]`` float32 in ``[0, 1]``."""
    import numpy as np
    import PIL.Image

    with PIL.Image.open(path) as image:
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def load_images(paths: list[str] | None, count: int, height: int, width: int) -> torch.Tensor | None:
    """``--images``: one RGB image file per prompt, or one for all ``count`` prompts, centre-cropped and resized to
    ``height x width`` as training clips are: ``[count, 3, height, width]`` in ``[0, 1]``; None without paths."""
    if not paths:
        return None
    if len(paths) not in (1, count):
        raise UsageError(f"got {len(paths)} --images for {count} prompts; expected one image per prompt, or one for "
                         "all")
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"--images: no image file {path!r}")
        try:
            probe_image(Path(path))
        except ValueError as err:
            raise UsageError(f"--images: {err}") from None
        images.append(resize_video(read_image(Path(path))[None], height, width)[0])
    stacked = torch.stack(images)  # (n, 3, h, w)
    return stacked.expand(count, -1, -1, -1).clone() if len(paths) == 1 else stacked


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
        first_frame_image: give each item its clip's first frame as ``"image"`` (image-to-video training); a
            manifest that names images itself cannot be combined with it.
    """

    def __init__(self, root: str, num_frames: int, height: int, width: int, metadata: str = "metadata.jsonl",
                 decode_check: bool = True, first_frame_image: bool = False) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.root, self.first_frame_image = Path(root), first_frame_image
        manifest = self.root / metadata
        if not manifest.is_file():
            raise FileNotFoundError(f"no manifest {manifest}; expected JSONL lines like "
                                    '{"file_name": "clip.mp4", "prompt": "..."}')
        self.entries: list[tuple[Path, str]] = []
        self.images: list[Path | None] = []  # each entry's conditioning image, if the manifest names them
        cropped = 0  # images whose aspect ratio differs from the clips'
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
            image = entry.get("image")
            if image is not None:
                image_path = resolve_inside(self.root, image, f"{where}: image")
                if not image_path.is_file():
                    problems.append((f"{where}: image file {image!r} not found under {self.root}",
                                     f"{short}: image {image!r} not found", True))
                    continue
                try:
                    w, h = probe_image(image_path)
                except ValueError as err:
                    problems.append((f"{where}: {err}", f"{short}: {str(err).replace(f' {image_path}', '')}", False))
                    continue
                cropped += abs(w / h - width / height) > 0.01 * width / height
            self.images.append(image_path if image is not None else None)
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
        with_image = sum(p is not None for p in self.images)
        if with_image and with_image < len(self.images):
            missing = [i + 1 for i, p in enumerate(self.images) if p is None][:MAX_LISTED]
            raise ValueError(f"{with_image} of {len(self.images)} entries in {manifest} name an 'image' and the "
                             f"others do not (entries {missing}); give every entry an image or none")
        if with_image and first_frame_image:
            raise ValueError(f"first_frame_image=True, but the entries in {manifest} name their own 'image'; use one")
        if cropped:
            warnings.warn(f"{cropped} of {with_image} conditioning images in {manifest} have another aspect ratio "
                          f"than the {width}x{height} clips and are centre-cropped to it", UserWarning, stacklevel=2)
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        path, prompt = self.entries[index]
        video = resize_video(read_video(path, num_frames=self.num_frames), self.height, self.width)
        item = {"video": video, "prompt": prompt}
        if self.images[index] is not None:
            item["image"] = resize_video(read_image(self.images[index])[None], self.height, self.width)[0]
        elif self.first_frame_image:
            item["image"] = video[0].clone()  # (3, h, w)
        return item


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
        first_frame_image: condition each clip on its own first frame (image-to-video; see
            :class:`VideoFolderDataset`, whose manifest may instead name an ``"image"`` per entry).
    """

    def __init__(self, root: str, num_frames: int, height: int, width: int, batch_size: int = 1,
                 val_root: str | None = None, num_workers: int = 0, seed: int = 0,
                 precomputed: str | None = None, decode_check: bool = True, first_frame_image: bool = False) -> None:
        super().__init__()
        if precomputed and first_frame_image:
            raise ValueError("first_frame_image=True cannot be combined with precomputed batches, which carry no "
                             "images; train from the videos")
        self.root, self.val_root = root, val_root
        self.num_frames, self.height, self.width = num_frames, height, width
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.precomputed, self.decode_check, self.first_frame_image = precomputed, decode_check, first_frame_image

    def setup(self, stage: str) -> None:
        if self.precomputed:
            self._setup_precomputed()
            return
        size = (self.num_frames, self.height, self.width)
        options = dict(decode_check=self.decode_check, first_frame_image=self.first_frame_image)
        self.train_set = VideoFolderDataset(self.root, *size, **options)
        self.val_set = VideoFolderDataset(self.val_root, *size, **options) if self.val_root else None

    def _setup_precomputed(self) -> None:
        import warnings

        from lit_videoalign.data.precomputed import PrecomputedDataset, file_sha256

        size = {"num_frames": self.num_frames, "height": self.height, "width": self.width}
        self.train_set = PrecomputedDataset(self.precomputed, "train", **size)
        self.val_set = PrecomputedDataset(self.precomputed, "val", **size) if self.val_root else None
        manifest = Path(self.root) / "metadata.jsonl"
        if manifest.is_file() and any('"image"' in line and "image" in json.loads(line)
                                      for line in manifest.read_text().splitlines() if line.strip()):
            raise ValueError(f"{manifest} names conditioning images, which precomputed batches do not carry; train "
                             "from the videos (without precomputed)")
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
