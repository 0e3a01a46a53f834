"""The fingerprint of the encoders (VAE, text encoders) that wrote a precomputed latent folder, and the check that a
training backbone matches it. (Checkpoints fingerprint a frozen base differently:
:mod:`lit_videoalign.backbones.fingerprint`.)

Both the writer (:mod:`lit_videoalign.data.precompute`) and the reader
(:class:`~lit_videoalign.data.video_folder.VideoFolderDataModule`) import this module, which imports neither of them.
The fingerprint holds the family, prompt length and the family options that shape the conditioning, a SHA-256 of the
VAE, text-encoder and tokenizer configs and files, and a SHA-256 of a sample of every VAE and text-encoder weight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from torch import nn

from lit_videoalign.backbones.base import VideoBackbone

# Family options that only change the transformer call or the decoder (LTX-Video), not latents or prompt embeddings.
NOT_ENCODING_OPTIONS = ("frame_rate", "decode_timestep")
WEIGHT_SAMPLE = 256  # leading elements of every encoder tensor that go into the weights fingerprint
# Fingerprint fields that must agree between the encoding and the training backbone.
MUST_MATCH = ("class", "family", "pixel_space", "max_sequence_length", "encoding_options", "config_sha256",
              "weights_sha256")


# -- fingerprint -------------------------------------------------------------------------------------------------------
def encoder_modules(backbone: VideoBackbone) -> list[nn.Module]:
    """The frozen modules that make latents and conditioning: VAE and text encoders (everything but the denoiser for
    a backbone that is not a diffusers one)."""
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone

    if isinstance(backbone, DiffusersVideoBackbone):
        return [m for m in (backbone.vae, *backbone.text_encoders) if m is not None]
    return [m for name, m in backbone.named_children() if name != "denoiser"]


def _weights_sha256(modules: list[nn.Module]) -> str:
    """SHA-256 over the name, shape and first :data:`WEIGHT_SAMPLE` elements (as bfloat16, so the same weights loaded in
    float32 or bfloat16 agree) of every tensor of ``modules``."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}:{tuple(t.shape)};".encode())
            head = t.detach().flatten()[:WEIGHT_SAMPLE].cpu()
            if head.is_floating_point():
                head = head.to(torch.bfloat16).view(torch.int16)
            h.update(head.numpy().tobytes())
    return h.hexdigest()


def backbone_fingerprint(backbone: VideoBackbone) -> dict:
    """What identifies the latents and prompt embeddings a backbone produces (see the module docstring)."""
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone

    cls = type(backbone)
    info: dict = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if isinstance(backbone, DiffusersVideoBackbone):
        family = backbone.family
        skip = (*family._FIXED, *NOT_ENCODING_OPTIONS)
        options = {f.name: getattr(family, f.name) for f in dataclasses.fields(family) if f.name not in skip}
        folders = [*family.text_encoders, *(tok for _, tok in family.text_pairs)]
        folders += ["vae"] if backbone.vae is not None else []
        h = hashlib.sha256()
        for folder in sorted(folders):  # configs and tokenizer files, not the weights (sampled below)
            for file in sorted((backbone._root / folder).rglob("*")):
                if file.is_file() and file.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
                    h.update(f"{file.relative_to(backbone._root).as_posix()};".encode())
                    h.update(file.read_bytes())
        info.update({"pretrained_model_name_or_path": backbone.pretrained_model_name_or_path,
                     "pipeline_path": str(backbone._root), "family": family.name,
                     "pixel_space": backbone.pixel_space, "max_sequence_length": backbone.max_sequence_length,
                     "encoding_options": json.loads(json.dumps(options)), "config_sha256": h.hexdigest()})
    info["weights_sha256"] = _weights_sha256(encoder_modules(backbone))
    return info


def check_backbone(index: dict, backbone: VideoBackbone, where: str | os.PathLike = "") -> None:
    """Refuse a training backbone that is not the one that encoded the precomputed data in ``where``."""
    stored, current = index["backbone"], backbone_fingerprint(backbone)
    differ = [k for k in MUST_MATCH if stored.get(k) != current.get(k)]
    if differ:
        said = "; ".join(f"{k}: stored {stored.get(k)!r}, model {current.get(k)!r}" for k in differ)
        raise ValueError(
            f"precomputed data in {where} was encoded by backbone "
            f"{stored.get('pretrained_model_name_or_path', stored.get('class'))!r}, which differs from the model's "
            f"{current.get('pretrained_model_name_or_path', current.get('class'))!r} ({said}); re-run "
            "`videoalign precompute` with this config, or point data.precomputed at data encoded by this backbone")
    shape = tuple(backbone.latent_shape(index["num_frames"], index["height"], index["width"]))
    if shape != tuple(index["latent_shape"]):
        raise ValueError(f"precomputed latents in {where} have shape {tuple(index['latent_shape'])}, but the model's "
                         f"backbone makes {shape} at {index['num_frames']}x{index['height']}x{index['width']}")
