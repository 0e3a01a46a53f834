"""Preference pairs from files: a JSONL manifest of ``(prompt, chosen, rejected)`` videos, decoded with PyAV.

One JSON object per line of ``root/<manifest>``; paths are relative to ``root`` and may not leave it::

    {"prompt": "a red ball falls", "chosen": "w/0.mp4", "rejected": "l/0.mp4",
     "tie": false,                                             # optional; ties are masked by DPO
     "labels": {"physics": 1, "visual": 0},                    # optional, +1: chosen better, -1: rejected, 0: tie
     "scores": {"chosen": {"overall": 0.9}, "rejected": {"overall": 0.2}},   # optional, per video and dimension
     "weight": 1.0,                                            # optional non-negative pair weight
     "image": "first/0.png",                                   # optional conditioning image (image-to-video)
     "chosen_latents": "w/0.safetensors", "rejected_latents": "l/0.safetensors"}   # optional precomputed latents

A conditioning image (RGB; every line or none) is read as ``[3, H, W]`` in ``[0, 1]``, centre-cropped and resized to
``height`` x ``width`` as the video folder does (at its own size, one across the set, when no size is given), and
batched as ``"image"``: DPO conditions both videos of the pair on it.

Latent files are safetensors holding one tensor ``"latents"`` of shape ``[C, T', H', W']`` (the backbone's layout).
Every entry is checked when the dataset is built (files present and inside the root, videos decodable, chosen and
rejected with the same frame count, enough frames, one frame count and size across the set when no resize is asked
for, latents of one shape, labels and scores with the same dimensions on every line), and all problems are reported
together, each naming its line and file: training never starts on a partial dataset unless ``skip_invalid`` is set,
and then a warning says how many pairs were dropped and why.

Run as a module to write a toy-world manifest (ground-truth videos chosen, physics-corrupted ones rejected)::

    python -m lit_videoalign.data.preference --root data/toy_pairs --num_pairs 256
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.data.video_folder import probe_image, read_image, resize_video, resolve_inside
from lit_videoalign.errors import shorten
from lit_videoalign.video_io import VideoInfo, probe_video, read_video  # noqa: F401 (VideoInfo: re-exported)

LATENT_KEY = "latents"
MAX_LISTED = 20  # problems listed in one error message


def load_latents(path: str | Path) -> Tensor:
    """The ``"latents"`` tensor of a safetensors file, ``[C, T', H', W']``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read latents {path}: {err}") from err
    if LATENT_KEY not in tensors:
        raise ValueError(f"latents file {path} has no tensor {LATENT_KEY!r}; it has {sorted(tensors)}")
    latents = tensors[LATENT_KEY]
    if latents.ndim != 4:
        raise ValueError(f"latents in {path} must have shape [C, T', H', W'], got {tuple(latents.shape)}")
    return latents


def _latent_shape(path: Path) -> tuple[int, ...]:
    """The shape of the ``"latents"`` tensor, read from the safetensors header without loading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if LATENT_KEY not in f.keys():
                raise ValueError(f"latents file {path} has no tensor {LATENT_KEY!r}; it has {sorted(f.keys())}")
            shape = tuple(f.get_slice(LATENT_KEY).get_shape())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read latents {path}: {err}") from err
    if len(shape) != 4:
        raise ValueError(f"latents in {path} must have shape [C, T', H', W'], got {shape}")
    return shape


@dataclass
class PreferenceEntry:
    """One validated manifest line."""

    where: str  # "manifest:line", for messages
    prompt: str
    chosen: Path | None
    rejected: Path | None
    tie: bool = False
    labels: dict[str, int] | None = None
    scores: dict[str, dict[str, float]] | None = None
    weight: float | None = None
    chosen_latents: Path | None = None
    rejected_latents: Path | None = None
    image: Path | None = None  # the conditioning image (image-to-video)


class PreferenceDataset(Dataset):
    """Preference pairs from ``root/<manifest>`` (see the module docstring for the format).

    Items are ``{"prompt": str, "chosen": Tensor[T, C, H, W], "rejected": Tensor[T, C, H, W], "tie": Tensor[]}``
    (or ``"chosen_latents"``/``"rejected_latents"`` ``[C, T', H', W']`` when latents are used) plus ``"labels"``
    ``{dim: Tensor[]}``, ``"scores"`` ``{"chosen": {dim: Tensor[]}, "rejected": {...}}``, ``"weight"`` and ``"image"``
    ``Tensor[3, H, W]`` when the manifest has them; the default collate batches them for
    :class:`~lit_videoalign.objectives.dpo.DPO`.

    Args:
        root: dataset folder.
        manifest: JSONL file inside ``root``.
        num_frames: frames per clip (the first ``num_frames``; shorter videos are an error); None keeps every
            frame and then requires one frame count across the dataset.
        height: output height (centre crop and resize); None requires one size across the dataset.
        width: output width.
        use_latents: read ``*_latents`` files instead of decoding videos; None uses them when every line has them.
        decode_check: decode every frame of every video up front; False only opens each file, decodes its first
            frame and counts packets (for large datasets; a file damaged later in its stream then fails when read).
        skip_invalid: drop invalid lines with a warning instead of raising (escaping paths always raise).
    """

    def __init__(
        self,
        root: str | Path,
        manifest: str = "pairs.jsonl",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        use_latents: bool | None = None,
        decode_check: bool = True,
        skip_invalid: bool = False,
    ) -> None:
        if (height is None) != (width is None):
            raise ValueError(f"give both height and width or neither, got height={height}, width={width}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.root = Path(root)
        self.manifest = self.root / manifest
        self.num_frames, self.height, self.width = num_frames, height, width
        if not self.manifest.is_file():
            raise FileNotFoundError(f"no preference manifest {self.manifest}; expected JSONL lines like "
                                    '{"prompt": "...", "chosen": "a.mp4", "rejected": "b.mp4"}')
        raw = self._parse()
        if not raw:
            raise ValueError(f"preference manifest {self.manifest} has no pairs")
        if use_latents is None:
            use_latents = all("chosen_latents" in e and "rejected_latents" in e for _, e in raw)
        self.use_latents = use_latents
        entries, problems = [], []
        for where, entry in raw:
            try:
                entries.append(self._entry(where, entry))
            except (ValueError, FileNotFoundError, TypeError) as err:
                if "escapes the dataset root" in str(err):
                    raise
                problems.append(str(err))
        entries, more = self._check_consistency(entries, decode_check)
        problems += more
        if problems:
            listed = "\n  ".join(problems[:MAX_LISTED])
            extra = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
            summary = f"preference manifest {self.manifest}: {len(problems)} of {len(raw)} pairs are invalid:\n  " \
                      f"{listed}{extra}"
            if not skip_invalid:
                raise ValueError(summary + "\nfix or remove them (or pass skip_invalid=True to train on the rest)")
            if not entries:
                raise ValueError(summary + "\nno valid pair is left")
            warnings.warn(f"{summary}\nskip_invalid=True: training on the {len(entries)} valid pairs only",
                          UserWarning, stacklevel=2)
        self.entries = entries

    # -- reading and checking the manifest -----------------------------------------------------------------------
    def _parse(self) -> list[tuple[str, dict]]:
        raw = []
        for lineno, line in enumerate(self.manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.manifest.name}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.manifest}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(entry, dict):
                raise ValueError(f"{self.manifest}:{lineno}: expected a JSON object, got {shorten(entry)}")
            raw.append((where, entry))
        return raw

    def _file(self, where: str, entry: dict, key: str) -> Path:
        if key not in entry:
            raise ValueError(f"{where}: missing {key!r}")
        path = resolve_inside(self.root, entry[key], f"{where} {key}")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {key} file {entry[key]!r} not found under {self.root}")
        return path

    def _entry(self, where: str, entry: dict) -> PreferenceEntry:
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {shorten(prompt)}")
        # Resolve every path first, so a path escaping the root is refused even on an otherwise broken line.
        for key in ("chosen", "rejected", "chosen_latents", "rejected_latents", "image"):
            if key in entry and not (key == "image" and entry[key] is None):
                resolve_inside(self.root, entry[key], f"{where} {key}")
        if self.use_latents:
            chosen = rejected = None
            chosen_l, rejected_l = self._file(where, entry, "chosen_latents"), self._file(where, entry,
                                                                                          "rejected_latents")
        else:
            chosen, rejected = self._file(where, entry, "chosen"), self._file(where, entry, "rejected")
            chosen_l = rejected_l = None
        tie = entry.get("tie", False)
        if not isinstance(tie, bool):
            raise ValueError(f"{where}: 'tie' must be true or false, got {shorten(tie)}")
        labels = entry.get("labels")
        if labels is not None:
            if not isinstance(labels, dict) or not all(isinstance(v, int) and v in (-1, 0, 1)
                                                       for v in labels.values()):
                raise ValueError(f"{where}: 'labels' must map dimensions to -1, 0 or +1, got {shorten(labels)}")
        scores = entry.get("scores")
        if scores is not None:
            ok = (isinstance(scores, dict) and set(scores) == {"chosen", "rejected"}
                  and all(isinstance(s, dict) for s in scores.values())
                  and set(scores["chosen"]) == set(scores["rejected"])
                  and all(isinstance(v, (int, float)) and math.isfinite(v)
                          for s in scores.values() for v in s.values()))
            if not ok:
                raise ValueError(f"{where}: 'scores' must be {{'chosen': {{dim: number}}, 'rejected': "
                                 f"{{dim: number}}}} with the same finite-valued dimensions, got {shorten(scores)}")
        weight = entry.get("weight")
        if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{where}: 'weight' must be a finite non-negative number, got {shorten(weight)}")
        image = None
        if entry.get("image") is not None:
            image = self._file(where, entry, "image")
            probe_image(image)  # decodes, and is RGB
        return PreferenceEntry(where, prompt, chosen, rejected, tie, labels, scores, weight, chosen_l, rejected_l,
                               image)

    def _check_consistency(self, entries: list[PreferenceEntry], decode: bool) -> tuple[list, list[str]]:
        """Check the files themselves and that every line can be batched with the others."""
        problems, good = [], []
        reference: dict[str, object] = {}

        def same(name: str, value, where: str, what: str) -> bool:
            if name not in reference:
                reference[name] = (value, where)
                return True
            if reference[name][0] == value:
                return True
            problems.append(f"{where}: {what} {value!r} differ from {reference[name][0]!r} of {reference[name][1]}")
            return False

        for e in entries:
            if not same("labels", sorted(e.labels) if e.labels is not None else None, e.where, "label dimensions"):
                continue
            if not same("scores", sorted(e.scores["chosen"]) if e.scores is not None else None, e.where,
                        "score dimensions"):
                continue
            if not same("weight", e.weight is not None, e.where, "has-weight"):
                continue
            first = reference.setdefault("image", (e.image is not None, e.where))
            if first[0] != (e.image is not None):
                problems.append(f"{e.where}: {'an' if e.image else 'no'} 'image', but {first[1]} has "
                                f"{'none' if e.image else 'one'}; give every pair a conditioning image or none")
                continue
            if e.image is not None and self.height is None and not same("image size", probe_image(e.image), e.where,
                                                                          "image (width, height)"):
                continue
            try:
                if self.use_latents:
                    shape_w, shape_l = _latent_shape(e.chosen_latents), _latent_shape(e.rejected_latents)
                    if shape_w != shape_l:
                        raise ValueError(f"{e.where}: mismatched latents: chosen {shape_w}, rejected {shape_l}")
                    if not same("latent shape", shape_w, e.where, "latent shape"):
                        continue
                else:
                    info_w, info_l = probe_video(e.chosen, decode), probe_video(e.rejected, decode)
                    if info_w.num_frames != info_l.num_frames:
                        raise ValueError(f"{e.where}: mismatched frame counts: chosen {e.chosen.name} has "
                                         f"{info_w.num_frames} frames, rejected {e.rejected.name} has "
                                         f"{info_l.num_frames}")
                    if self.num_frames is not None and info_w.num_frames < self.num_frames:
                        raise ValueError(f"{e.where}: {e.chosen.name} has {info_w.num_frames} frames, expected at "
                                         f"least num_frames={self.num_frames}")
                    if self.num_frames is None and not same("frames", info_w.num_frames, e.where, "frame count"):
                        continue
                    sizes = {(info_w.height, info_w.width), (info_l.height, info_l.width)}
                    if self.height is None:
                        if len(sizes) > 1:
                            raise ValueError(f"{e.where}: chosen and rejected differ in size {sorted(sizes)}; set "
                                             f"height and width to resize")
                        if not same("size", sizes.pop(), e.where, "frame size"):
                            continue
            except ValueError as err:
                msg = str(err)
                problems.append(msg if msg.startswith(e.where) else f"{e.where}: {msg}")
                continue
            good.append(e)
        return good, problems

    # -- items ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def _video(self, path: Path) -> Tensor:
        video = read_video(path, num_frames=self.num_frames)  # (t, c, h, w)
        if self.height is not None:
            video = resize_video(video, self.height, self.width)
        return video

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        item: dict = {"prompt": e.prompt, "tie": torch.tensor(e.tie)}
        if self.use_latents:
            item["chosen_latents"] = load_latents(e.chosen_latents)
            item["rejected_latents"] = load_latents(e.rejected_latents)
        else:
            item["chosen"], item["rejected"] = self._video(e.chosen), self._video(e.rejected)
        if e.labels is not None:
            item["labels"] = {k: torch.tensor(v) for k, v in e.labels.items()}
        if e.scores is not None:
            item["scores"] = {side: {k: torch.tensor(float(v)) for k, v in s.items()} for side, s in e.scores.items()}
        if e.weight is not None:
            item["weight"] = torch.tensor(float(e.weight))
        if e.image is not None:
            image = read_image(e.image)  # (3, h, w)
            item["image"] = image if self.height is None else resize_video(image[None], self.height, self.width)[0]
        return item


class PreferenceDataModule(L.LightningDataModule):
    """Serves :class:`PreferenceDataset` pairs for :class:`~lit_videoalign.objectives.dpo.DPO`.

    Args:
        root: dataset folder.
        manifest: training manifest inside ``root``.
        val_manifest: optional validation manifest inside ``root``.
        num_frames: frames per clip (None: all, one count across the set).
        height: frame height (None: no resize, one size across the set).
        width: frame width.
        batch_size: pairs per batch.
        use_latents: read precomputed latents (None: when every line has them).
        decode_check: decode every video up front (see :class:`PreferenceDataset`).
        skip_invalid: drop invalid lines with a warning instead of raising.
        num_workers: data-loader processes.
        seed: shuffling seed.
    """

    def __init__(
        self,
        root: str,
        manifest: str = "pairs.jsonl",
        val_manifest: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 1,
        use_latents: bool | None = None,
        decode_check: bool = True,
        skip_invalid: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.root, self.manifest, self.val_manifest = root, manifest, val_manifest
        self.kwargs = {"num_frames": num_frames, "height": height, "width": width, "use_latents": use_latents,
                       "decode_check": decode_check, "skip_invalid": skip_invalid}
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: PreferenceDataset | None = None
        self.val_set: PreferenceDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is None:  # every pair is checked once, before the first step
            self.train_set = PreferenceDataset(self.root, self.manifest, **self.kwargs)
            if self.val_manifest:
                self.val_set = PreferenceDataset(self.root, self.val_manifest, **self.kwargs)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                   num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


# -- a toy-world manifest on disk --------------------------------------------------------------------------------------
def write_toyworld_manifest(
    root: str | Path,
    num_pairs: int,
    seed: int = 0,
    corruptions: list[str] | tuple[str, ...] | None = None,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    max_balls: int = 1,
    manifest: str = "pairs.jsonl",
) -> Path:
    """Write toy-world pairs as MP4 files plus a manifest: the ground-truth video chosen, a corrupted one rejected.

    Pair ``i`` comes from toy-world seed ``seed + i``; its corruption is drawn from ``corruptions`` (default: the
    physics ones), and its ``labels`` follow :func:`~lit_videoalign.data.toyworld_pairs.labels_for`.

    Returns:
        The manifest path.
    """
    from lit_videoalign.data.toyworld import PHYSICS_CORRUPTIONS, ToyWorld
    from lit_videoalign.data.toyworld_pairs import PAIR_CORRUPTIONS, apply_corruption, labels_for
    from lit_videoalign.video_io import atomic_path, write_mp4

    corruptions = tuple(PHYSICS_CORRUPTIONS if corruptions is None else corruptions)
    unknown = [c for c in corruptions if c not in PAIR_CORRUPTIONS]
    if unknown or not corruptions:
        raise ValueError(f"corruptions must be a non-empty subset of {list(PAIR_CORRUPTIONS)}, got {list(corruptions)}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be positive, got {num_pairs}")
    root = Path(root)
    world = ToyWorld(num_frames, height, width, max_balls=max_balls)
    lines = []
    for i in range(num_pairs):
        g = torch.Generator().manual_seed(seed + i)
        kind = corruptions[int(torch.randint(len(corruptions), (), generator=g))]
        clean = world.example(seed + i, require_bounce=kind == "time_reversal")
        bad = apply_corruption(world, clean, kind, g)
        write_mp4(clean.video, root / "chosen" / f"{i:06d}.mp4")
        write_mp4(bad.video, root / "rejected" / f"{i:06d}.mp4")
        lines.append(json.dumps({"prompt": clean.prompt, "chosen": f"chosen/{i:06d}.mp4",
                                 "rejected": f"rejected/{i:06d}.mp4", "tie": False,
                                 "labels": labels_for(None, kind), "corruption": kind, "seed": seed + i}))
    with atomic_path(root / manifest) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return root / manifest


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Write a toy-world preference manifest (clean chosen, corrupted "
                                                 "rejected) with MP4 files.")
    parser.add_argument("--root", required=True)
    parser.add_argument("--num_pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corruptions", nargs="+", default=None)
    parser.add_argument("--max_balls", type=int, default=1)
    args = parser.parse_args(argv)
    path = write_toyworld_manifest(args.root, args.num_pairs, args.seed, args.corruptions, max_balls=args.max_balls)
    print(f"wrote {args.num_pairs} pairs to {path}")
    return path


if __name__ == "__main__":
    main()
