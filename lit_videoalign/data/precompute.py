"""``videoalign precompute``: encode a video dataset's latents and prompt embeddings once, into safetensors shards.

    videoalign precompute --config configs/wan2.1-1.3b/sft_lora.yaml --output_dir data/my_videos.wan-1.3b
    videoalign fit --config configs/wan2.1-1.3b/sft_lora.yaml --data.init_args.precomputed data/my_videos.wan-1.3b

The config's backbone encodes the videos of its ``data:`` folder (``VideoFolderDataModule``: ``root`` and
``val_root``, at its ``num_frames``/``height``/``width``) through the VAE and their prompts through the text
encoder(s), plus the model's ``negative_prompt`` once (for prompt dropout). Training with ``data.precomputed`` then
reads the shards and never runs the VAE encoder or a text encoder (a config for a pixel-space model skips only the
text encoder). The folder layout is described in :mod:`lit_videoalign.data.precomputed`; the folder appears whole or
not at all.

The index records a fingerprint of the encoding backbone: family, prompt length and the family options that shape
the conditioning, a SHA-256 of the VAE, text-encoder and tokenizer configs and files, and a SHA-256 of a sample of
every VAE and text-encoder weight (:mod:`lit_videoalign.data.encoder_fingerprint`). Training a backbone whose
fingerprint differs is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from lit_videoalign.backbones.base import VideoBackbone
from lit_videoalign.data.encoder_fingerprint import backbone_fingerprint, encoder_modules
from lit_videoalign.data.precomputed import FORMAT, INDEX, NEGATIVE, conditioning_tensors, file_sha256
from lit_videoalign.video_io import atomic_dir


# -- writing -----------------------------------------------------------------------------------------------------------
def _move_encoders(backbone: VideoBackbone, device: torch.device) -> torch.device:
    """Put the encoders (not the denoiser, which precompute never runs) on ``device``; returns it."""
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone

    if isinstance(backbone, DiffusersVideoBackbone):
        for module in encoder_modules(backbone):
            module.to(device)
    else:
        backbone.to(device)
    return device


def _write_split(backbone: VideoBackbone, dataset, out: Path, split: str, batch_size: int, shard_size: int,
                 device: torch.device, num_workers: int) -> dict:
    """Encode one dataset into ``{split}-NNNNN.safetensors`` shards under ``out``; returns its index entry."""
    from safetensors.torch import save_file

    shards = []
    for k, start in enumerate(range(0, len(dataset), shard_size)):
        rows = list(range(start, min(start + shard_size, len(dataset))))
        loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False, num_workers=num_workers)
        latents, conds = [], []
        for batch in loader:
            latents.append(backbone.encode_videos(batch["video"].to(device)).cpu())  # (b, c, t, h, w)
            cond = conditioning_tensors(backbone.encode_prompts(batch["prompt"]))  # prompt_embeds (b, l, d), ...
            conds.append({key: v.cpu() for key, v in cond.items()})
        tensors = {"latents": torch.cat(latents)}
        tensors.update({key: torch.cat([c[key] for c in conds]) for key in conds[0]})
        entries = [dataset.entries[i] for i in rows]
        meta = {"format": FORMAT, "prompts": json.dumps([p for _, p in entries]),
                "sources": json.dumps([path.relative_to(dataset.root.resolve()).as_posix()
                                       if path.is_relative_to(dataset.root.resolve()) else str(path)
                                       for path, _ in entries])}
        name = f"{split}-{k:05d}.safetensors"
        save_file({key: v.contiguous() for key, v in tensors.items()}, str(out / name), metadata=meta)
        shards.append({"file": name, "num_examples": len(rows)})
        print(f"precompute {split}: {rows[-1] + 1}/{len(dataset)} examples", flush=True)
    manifest = dataset.root / "metadata.jsonl"
    return {"root": str(dataset.root.resolve()), "num_examples": len(dataset), "shards": shards,
            "latent_dtype": str(tensors["latents"].dtype),
            "manifest_sha256": file_sha256(manifest) if manifest.is_file() else None}


def precompute(backbone: VideoBackbone, root: str | os.PathLike, output_dir: str | os.PathLike, num_frames: int,
               height: int, width: int, *, val_root: str | os.PathLike | None = None, negative_prompt: str = "",
               batch_size: int = 4, shard_size: int = 128, device: str | torch.device | None = None,
               num_workers: int = 0) -> Path:
    """Encode the video folder ``root`` (and ``val_root``) with ``backbone`` into ``output_dir``, atomically.

    Args:
        backbone: the encoding backbone (its VAE and text encoders run; the denoiser does not).
        root: training folder with ``metadata.jsonl`` (a :class:`~lit_videoalign.data.video_folder.VideoFolderDataset`).
        output_dir: the folder to write; an existing one is replaced only once the new one is complete.
        num_frames: frames per clip.
        height: frame height.
        width: frame width.
        val_root: validation folder, written as the ``val`` split.
        negative_prompt: the unconditional prompt whose conditioning is stored once (prompt dropout, guidance).
        batch_size: videos encoded at once.
        shard_size: examples per shard file.
        device: where the encoders run (default: CUDA when available, else CPU).
        num_workers: data-loader processes decoding the videos.

    Returns:
        ``output_dir``.
    """
    from safetensors.torch import save_file

    from lit_videoalign.backbones.loading import resolve_device
    from lit_videoalign.data.video_folder import VideoFolderDataset

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    latent_shape = tuple(backbone.latent_shape(num_frames, height, width))  # refuse an impossible size first
    splits = {"train": VideoFolderDataset(str(root), num_frames, height, width)}
    if val_root:
        splits["val"] = VideoFolderDataset(str(val_root), num_frames, height, width)
    dev = _move_encoders(backbone, torch.device(device) if device is not None else resolve_device(None))

    index = {"format": FORMAT, "backbone": backbone_fingerprint(backbone), "num_frames": num_frames,
             "height": height, "width": width, "latent_shape": list(latent_shape), "negative_prompt": negative_prompt,
             "splits": {}}
    out = Path(output_dir)
    with torch.no_grad(), atomic_dir(out) as tmp:
        negative = conditioning_tensors(backbone.encode_prompts([negative_prompt]))
        save_file({k: v.cpu().contiguous() for k, v in negative.items()}, str(tmp / NEGATIVE),
                  metadata={"prompt": negative_prompt})
        for split, dataset in splits.items():
            index["splits"][split] = _write_split(backbone, dataset, tmp, split, batch_size, shard_size, dev,
                                                  num_workers)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out


def precompute_datamodule(model, datamodule, output_dir: str | os.PathLike | None = None, **kwargs) -> Path:
    """:func:`precompute` for a config's model and video-folder data module (what ``videoalign precompute`` runs).

    ``output_dir`` defaults to the data module's ``precomputed`` folder, so one config serves both commands.
    """
    needed = ("root", "num_frames", "height", "width")
    if datamodule is None or not all(hasattr(datamodule, a) for a in needed):
        got = "none" if datamodule is None else type(datamodule).__name__
        raise TypeError(f"precompute reads a folder of videos: the config's data must be a VideoFolderDataModule "
                        f"(with {', '.join(needed)}), got {got}")
    output_dir = output_dir or getattr(datamodule, "precomputed", None)
    if not output_dir:
        raise ValueError("precompute needs --output_dir DIR (or data.init_args.precomputed in the config)")
    out = precompute(model.backbone, datamodule.root, output_dir, datamodule.num_frames, datamodule.height,
                     datamodule.width, val_root=getattr(datamodule, "val_root", None),
                     negative_prompt=model.hparams.get("negative_prompt", ""), **kwargs)
    print(f"wrote precomputed latents and prompt embeddings to {out}; train on them with "
          f"--data.init_args.precomputed {out}")
    return out
