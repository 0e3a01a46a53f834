"""Model families of the diffusers backbone: how each diffusers pipeline (Wan 2.1/2.2 and Wan I2V, LTX-Video,
HunyuanVideo) encodes prompts (and images), normalises VAE latents, calls its transformer and sets its scheduler's
timesteps, so that :class:`~lit_videoalign.backbones.diffusers.DiffusersVideoBackbone` reproduces that pipeline. A new
family is one module here with a subclass of :class:`ModelFamily`, and one entry in ``FAMILIES``."""

from __future__ import annotations

from lit_videoalign.backbones.families.base import ModelFamily
from lit_videoalign.backbones.families.hunyuan import HunyuanVideoFamily
from lit_videoalign.backbones.families.hunyuan15 import HunyuanVideo15Family
from lit_videoalign.backbones.families.ltx import LTXFamily, pack_latents, unpack_latents
from lit_videoalign.backbones.families.ltx2 import LTX2Family
from lit_videoalign.backbones.families.wan import WanFamily

__all__ = ["FAMILIES", "HunyuanVideoFamily", "LTXFamily", "ModelFamily", "WanFamily", "family_for", "pack_latents",
           "unpack_latents"]

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (WanFamily(), LTXFamily(), HunyuanVideoFamily(),
                                                       HunyuanVideo15Family(), LTX2Family())}


def family_for(transformer_class: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.transformer_class == transformer_class:
            return family
    supported = {f.name: f.transformer_class for f in FAMILIES.values()}
    raise ValueError(f"transformer class {transformer_class!r} is not a supported family; supported: {supported}")
