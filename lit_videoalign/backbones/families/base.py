"""What every model family of the diffusers backbone implements (:class:`ModelFamily`), and the helpers the families
share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone  # bb: the DiffusersVideoBackbone calling

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# -- helpers shared by the families --------------------------------------------------------------------------------
def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
              device: torch.device) -> tuple[Tensor, Tensor]:
    """Pad and truncate to ``max_length`` as the diffusers pipelines do. Returns ``ids, mask``, each ``(b, l)``."""
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                       return_attention_mask=True, return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _per_channel(values: Any, like: Tensor) -> Tensor:
    """A per-channel statistic (list or tensor ``[C]``) shaped ``(1, C, 1, 1, 1)`` to broadcast over latents."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def _extra(cond: Conditioning, key: str, family: str, what: str) -> Tensor:
    if key not in cond.extra:
        raise ValueError(f"{family} conditioning needs extra[{key!r}] ({what}), got extra keys {sorted(cond.extra)}; "
                         "build it with encode_prompts")
    return cond.extra[key]


def _condition_channels(transformer: nn.Module) -> int:
    """Input channels of a Wan transformer besides the noisy latents (Wan 2.1 I2V: 4 mask + 16 image latents)."""
    config = transformer.config
    return config.in_channels - (config.out_channels or config.in_channels)


def _uint8_images(images: Tensor) -> list[np.ndarray]:
    """``(b, c, h, w)`` in ``[0, 1]`` -> one ``(h, w, c)`` uint8 array per image, what a PIL image gives a processor."""
    return list((images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


@dataclass(frozen=True)
class ModelFamily:
    """How one diffusers model family maps to the project's conventions. One subclass per family, one instance in
    ``FAMILIES``; fields not in ``_FIXED`` are options a config may override (``family_options`` of the backbone).

    Hooks receive the backbone (for its tokenizers, text encoders, VAE and denoiser) or just the VAE.

    Attributes:
        name: short family name used in configs (``"wan"``).
        transformer_class: the diffusers transformer class name that identifies the family.
        max_sequence_length: default prompt length in tokens (the family's pipeline default).
        lora_targets: default LoRA target module names.
        text_encoders: the pipeline's text-encoder components; each ``text_encoder*`` has a ``tokenizer*``.
    """

    name: str = ""
    transformer_class: str = ""
    max_sequence_length: int = 512
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoders: tuple[str, ...] = ("text_encoder",)

    _FIXED = ("name", "transformer_class", "max_sequence_length", "lora_targets", "text_encoders")
    default_fps = 16.0  # frame rate the family's videos are exported at (not a field: the backbone's ``fps`` wins)
    # Not fields either: ``model_index.json`` components besides the text encoders and the VAE that the family loads
    # itself (:meth:`load_component`; the backbone freezes them, counts them with its text encoders and saves them),
    # and components it leaves unloaded but copies unchanged into saved pipelines (LTX-2: connectors; audio VAE).
    frozen_components = ()
    copied_components = ()

    @property
    def text_pairs(self) -> list[tuple[str, str]]:
        """``(text_encoder, tokenizer)`` component names, e.g. ``[("text_encoder", "tokenizer"), ...]``."""
        return [(te, te.replace("text_encoder", "tokenizer")) for te in self.text_encoders]

    @property
    def components(self) -> tuple[str, ...]:
        """The ``model_index.json`` entries this family needs besides the (optional) VAE."""
        return ("transformer", *(name for pair in self.text_pairs for name in pair))

    def with_options(self, options: dict[str, Any] | None) -> ModelFamily:
        """A copy with ``options`` (family-specific settings such as LTX's ``frame_rate``) replaced."""
        if not options:
            return self
        allowed = sorted(f.name for f in dataclasses.fields(self) if f.name not in self._FIXED)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown family_options {unknown} for model family {self.name!r}; allowed: {allowed}")
        return dataclasses.replace(self, **options)

    def load_component(self, root: Path, index: dict, name: str, dtype: torch.dtype) -> nn.Module:
        """One of :attr:`frozen_components` from the pipeline folder ``root`` (``index``: its ``model_index.json``)."""
        raise NotImplementedError(f"model family {self.name!r} loads no component {name!r}")

    # prompts
    def encode_prompts(self, bb: VideoBackbone, prompts: list[str]) -> Conditioning:
        """Tokenise and encode ``prompts`` (already validated) the way the family's pipeline does."""
        raise NotImplementedError(f"model family {self.name!r} has no prompt encoder")

    # VAE
    def latent_channels(self, vae: nn.Module) -> int:
        return vae.config.latent_channels

    def vae_compression(self, vae: nn.Module) -> tuple[int, int]:
        """``(temporal, spatial)`` compression: ``1 + t*k`` frames map to ``1 + k`` latent frames, ``s`` pixels to 1."""
        return vae.temporal_compression_ratio, vae.spatial_compression_ratio

    def normalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Raw VAE posterior mean -> the latents the transformer is trained on."""
        raise NotImplementedError(f"model family {self.name!r} has no latent normalisation")

    def denormalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        raise NotImplementedError(f"model family {self.name!r} has no latent normalisation")

    def decode_vae(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Denormalised latents -> pixels ``[B, C, T, H, W]`` in about ``[-1, 1]``."""
        return vae.decode(latents, return_dict=False)[0]

    # transformer
    def call_transformer(self, bb: VideoBackbone, transformer: nn.Module, latents: Tensor, timestep: Tensor,
                         cond: Conditioning) -> Tensor:
        """Run ``transformer`` on ``[B, C, T', H', W']`` latents with diffusers timesteps ``[B]``; same layout out."""
        raise NotImplementedError(f"model family {self.name!r} has no transformer call")

    def set_timesteps_kwargs(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """What the family's pipeline passes to ``scheduler.set_timesteps`` besides the steps (Wan: nothing)."""
        return {}

    # images (image-to-video)
    def supports_images(self, bb: VideoBackbone) -> bool:
        """Whether the loaded pipeline ``bb`` takes conditioning images."""
        return False

    def check_backbone(self, bb: VideoBackbone) -> None:
        """Refuse, once after loading, a pipeline this family cannot call the way its diffusers pipeline does."""

    def encode_images(self, bb: VideoBackbone, images: Tensor, num_frames: int,
                      last_images: Tensor | None) -> dict[str, Tensor]:
        """``extra["image_*"]`` encodings of validated ``images`` ``(b, 3, h, w)`` in ``[0, 1]``."""
        raise NotImplementedError(f"model family {self.name!r} has no image encoding")

