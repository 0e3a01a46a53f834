"""LTX-Video (``LTXPipeline``) as a model family of the diffusers backbone, and the token packing its transformer
takes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone  # bb: the DiffusersVideoBackbone calling
from lit_videoalign.backbones.families.base import (
    ModelFamily,
    _device,
    _per_channel,
    _tokenize,
)
from lit_videoalign.schedules.samplers import dynamic_shift_mu


def pack_latents(latents: Tensor, patch_size: int = 1, patch_size_t: int = 1) -> Tensor:
    """``[B, C, T, H, W]`` -> tokens ``[B, T/pt * H/p * W/p, C * pt * p * p]`` (LTX-Video's transformer input)."""
    b, c, t, h, w = latents.shape
    x = latents.reshape(b, c, t // patch_size_t, patch_size_t, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_latents(tokens: Tensor, grid: tuple[int, int, int], patch_size: int = 1, patch_size_t: int = 1) -> Tensor:
    """Inverse of :func:`pack_latents`; ``grid`` is the token grid ``(T/pt, H/p, W/p)``."""
    t, h, w = grid
    x = tokens.reshape(tokens.shape[0], t, h, w, -1, patch_size_t, patch_size, patch_size)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)




@dataclass(frozen=True)
class LTXFamily(ModelFamily):
    """LTX-Video (``LTXPipeline``): T5 run *without* the mask, the mask goes to the transformer; latents normalised by
    the VAE's ``latents_mean``/``latents_std`` buffers and ``scaling_factor``; the transformer takes packed tokens
    ``[B, T'H'W', C]`` plus the latent grid and ``rope_interpolation_scale = (t_ratio / frame_rate, s_ratio, s_ratio)``.

    Options:
        frame_rate: the ``frame_rate`` the pipeline is called with (its default, 25); it scales temporal RoPE.
        decode_timestep: timestep of timestep-conditioned VAE decoders (the pipeline default 0.0, no decode noise).
    """

    name: str = "ltx"
    transformer_class: str = "LTXVideoTransformer3DModel"
    max_sequence_length: int = 128
    frame_rate: float = 25.0
    decode_timestep: float = 0.0

    @property
    def default_fps(self) -> float:
        return self.frame_rate

    def set_timesteps_kwargs(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """``LTXPipeline``'s sigmas and, for a dynamic-shifting scheduler, ``mu`` of the token count ``t * h * w``."""
        kwargs: dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        if scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = dynamic_shift_mu(scheduler.config, math.prod(latent_shape[1:]))
        return kwargs

    def encode_prompts(self, bb: VideoBackbone, prompts: list[str]) -> Conditioning:
        ids, mask = _tokenize(bb.tokenizer, prompts, bb.max_sequence_length, _device(bb.text_encoder))
        embeds = bb.text_encoder(ids)[0]  # (b, l, d); LTXPipeline encodes without the attention mask
        return Conditioning(prompt_embeds=embeds.to(bb.denoiser.dtype), prompt_mask=mask)

    def normalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        mean, std = _per_channel(vae.latents_mean, latents), _per_channel(vae.latents_std, latents)
        return (latents - mean) * vae.config.scaling_factor / std

    def denormalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        mean, std = _per_channel(vae.latents_mean, latents), _per_channel(vae.latents_std, latents)
        return latents * std / vae.config.scaling_factor + mean

    def decode_vae(self, vae: nn.Module, latents: Tensor) -> Tensor:
        temb = None
        if vae.config.timestep_conditioning:
            temb = torch.full((latents.shape[0],), self.decode_timestep, dtype=latents.dtype, device=latents.device)
        return vae.decode(latents, temb, return_dict=False)[0]

    def call_transformer(self, bb, transformer, latents, timestep, cond):
        _, _, t, h, w = latents.shape
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        grid = (t // pt, h // p, w // p)
        ft, fs = self.vae_compression(bb.vae) if bb.vae is not None else (1, 1)
        out = transformer(hidden_states=pack_latents(latents, p, pt), encoder_hidden_states=cond.prompt_embeds,
                          timestep=timestep, encoder_attention_mask=cond.prompt_mask, num_frames=grid[0],
                          height=grid[1], width=grid[2], rope_interpolation_scale=(ft / self.frame_rate, fs, fs),
                          return_dict=False)[0]
        return unpack_latents(out, grid, p, pt)  # (b, c, t, h, w)

