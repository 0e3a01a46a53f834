"""Latents and prompt embeddings written once by ``videoalign precompute``, read back as training examples.

The folder (see :mod:`lit_videoalign.data.precompute` for how it is written)::

    index.json                   # format, the encoding backbone's fingerprint, video size, latent shape, splits
    negative.safetensors         # the negative prompt's conditioning, one row (prompt dropout for guidance)
    train-00000.safetensors ...  # N examples each: "latents" [N, C, T', H', W'], "prompt_embeds" [N, L, D],
                                 # "prompt_mask" [N, L] (when the family has one), "extra.<key>" [N, ...];
                                 # metadata "prompts" and "sources" (JSON lists)
    val-00000.safetensors ...    # the same for the validation folder, if one was given

Items are ``{"latents": Tensor[C, T', H', W'], "prompt": str, "cond": {"prompt_embeds", "prompt_mask", "extra"}}``;
:meth:`PrecomputedDataset.collate` batches them and adds the negative prompt's conditioning once per batch
(``"negative_cond"``, batch 1, and the ``"negative_prompt"`` string), so an objective builds its
:class:`~lit_videoalign.backbones.base.Conditioning` with :func:`precomputed_conditioning` and never runs the VAE or
the text encoder.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from lit_videoalign.backbones.base import Conditioning

FORMAT = "lit_videoalign.precomputed/1"
INDEX = "index.json"
NEGATIVE = "negative.safetensors"
EXTRA_PREFIX = "extra."


# -- conditioning <-> tensors ------------------------------------------------------------------------------------------
def conditioning_tensors(cond: Conditioning) -> dict[str, Tensor]:
    """A :class:`Conditioning` as flat safetensors entries (``prompt_embeds``, ``prompt_mask``, ``extra.<key>``)."""
    out = {"prompt_embeds": cond.prompt_embeds}
    if cond.prompt_mask is not None:
        out["prompt_mask"] = cond.prompt_mask
    out.update({EXTRA_PREFIX + k: v for k, v in cond.extra.items()})
    return out


def conditioning_dict(tensors: dict[str, Tensor]) -> dict:
    """Flat safetensors entries -> the nested ``{"prompt_embeds", "prompt_mask", "extra"}`` of batches."""
    out = {"prompt_embeds": tensors["prompt_embeds"],
           "extra": {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}}
    if "prompt_mask" in tensors:
        out["prompt_mask"] = tensors["prompt_mask"]
    return out


def to_conditioning(cond: dict) -> Conditioning:
    """A batch's ``"cond"`` dict as a :class:`Conditioning`."""
    return Conditioning(cond["prompt_embeds"], cond.get("prompt_mask"), dict(cond.get("extra") or {}))


def precomputed_conditioning(batch: dict, dropout: float, negative_prompt: str) -> Conditioning:
    """The conditioning of a precomputed batch; with ``dropout``, each sample is replaced by the negative prompt's
    with that probability, drawing from the global RNG exactly as
    :meth:`~lit_videoalign.objectives.base.AlignmentModule.encode_prompts` does (so a seed drops the same samples
    whether the prompts are encoded now or were precomputed)."""
    cond = to_conditioning(batch["cond"])
    if dropout <= 0:
        return cond
    drop = torch.rand(len(cond)) < dropout
    stored = batch.get("negative_prompt")
    if stored != negative_prompt:
        raise ValueError(f"prompt dropout replaces prompts by the negative prompt {negative_prompt!r}, but the "
                         f"precomputed data holds the embedding of {stored!r}; re-run `videoalign precompute` with the "
                         "model's negative_prompt, or set the model's negative_prompt to the stored one")
    if not drop.any():
        return cond
    negative = to_conditioning(batch["negative_cond"])

    def pick(t: Tensor, n: Tensor) -> Tensor:  # (b, ...) from the sample or, where dropped, the negative row
        mask = drop.to(t.device).view(-1, *([1] * (t.ndim - 1)))
        return torch.where(mask, n.to(t), t)

    mask = None if cond.prompt_mask is None else pick(cond.prompt_mask, negative.prompt_mask)
    return Conditioning(pick(cond.prompt_embeds, negative.prompt_embeds), mask,
                        {k: pick(v, negative.extra[k]) for k, v in cond.extra.items()})


# -- the folder --------------------------------------------------------------------------------------------------------
def read_index(path: str | Path) -> dict:
    """``index.json`` of a precomputed folder, checked for its format."""
    path = Path(path)
    file = path / INDEX
    if not file.is_file():
        raise FileNotFoundError(f"no precomputed data in {path} (no {INDEX}); write it with "
                                "`videoalign precompute --config CONFIG --output_dir DIR`")
    index = json.loads(file.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{file} has format {index.get('format')!r}; expected {FORMAT!r} (re-run videoalign "
                         "precompute with this version)")
    return index


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class PrecomputedDataset(Dataset):
    """One split of a precomputed folder.

    Args:
        path: the folder written by ``videoalign precompute``.
        split: ``"train"`` or ``"val"``.
        num_frames: expected frames per clip; the folder must have been encoded at this size (None: any).
        height: expected frame height.
        width: expected frame width.
    """

    def __init__(self, path: str | Path, split: str = "train", num_frames: int | None = None,
                 height: int | None = None, width: int | None = None) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.path = Path(path)
        self.index = index = read_index(self.path)
        if split not in index["splits"]:
            raise ValueError(f"precomputed data in {self.path} has no {split!r} split (it has "
                             f"{sorted(index['splits'])}); re-run videoalign precompute with that folder configured")
        expected = {"num_frames": num_frames, "height": height, "width": width}
        wrong = {k: (v, index[k]) for k, v in expected.items() if v is not None and v != index[k]}
        if wrong:
            said = ", ".join(f"{k}={v} (stored {s})" for k, (v, s) in wrong.items())
            raise ValueError(f"precomputed data in {self.path} was encoded at {index['num_frames']} frames of "
                             f"{index['height']}x{index['width']}, but the data module asks for {said}; re-run "
                             "videoalign precompute at this size")
        self.split = split
        latent_shape = tuple(index["latent_shape"])
        self.files: list[Path] = []
        self.prompts: list[str] = []
        self.sources: list[str] = []
        self.starts: list[int] = []
        for shard in index["splits"][split]["shards"]:
            file = self.path / shard["file"]
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                shape = tuple(f.get_slice("latents").get_shape())
            prompts = json.loads(meta.get("prompts", "[]"))
            if shape != (shard["num_examples"], *latent_shape) or len(prompts) != shard["num_examples"]:
                raise ValueError(f"precomputed shard {file} holds latents {shape} and {len(prompts)} prompts; the "
                                 f"index expects {shard['num_examples']} examples of {latent_shape}")
            self.starts.append(len(self.prompts))
            self.files.append(file)
            self.prompts += prompts
            self.sources += json.loads(meta.get("sources", "[]"))
        if not self.prompts:
            raise ValueError(f"precomputed split {split!r} in {self.path} has no examples")
        self.negative_prompt: str = index["negative_prompt"]
        self.negative = conditioning_dict(load_file(str(self.path / NEGATIVE)))  # batch 1

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        from safetensors import safe_open

        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} precomputed examples")
        k = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[k]
        with safe_open(str(self.files[k]), framework="pt") as f:  # memory-mapped: reads one row
            tensors = {name: f.get_slice(name)[row:row + 1][0] for name in f.keys()}
        latents = tensors.pop("latents")
        return {"latents": latents, "prompt": self.prompts[index], "cond": conditioning_dict(tensors)}

    def collate(self, items: list[dict]) -> dict:
        """Default collation plus the negative prompt's conditioning (batch 1) and text, once per batch."""
        batch = default_collate(items)
        batch["negative_cond"] = self.negative
        batch["negative_prompt"] = self.negative_prompt
        return batch
