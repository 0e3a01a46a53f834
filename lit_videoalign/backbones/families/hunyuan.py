"""HunyuanVideo (``HunyuanVideoPipeline``) as a model family of the diffusers backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone  # bb: the DiffusersVideoBackbone calling
from lit_videoalign.backbones.families.base import (
    ModelFamily,
    _device,
    _extra,
    _tokenize,
)


@dataclass(frozen=True)
class HunyuanVideoFamily(ModelFamily):
    """HunyuanVideo (``HunyuanVideoPipeline``): Llama hidden states ``hidden_state_skip_layer`` layers below the top,
    from the prompt in a chat template whose first ``crop_start`` tokens are cut off, with their mask; CLIP's pooled
    output as ``extra["pooled_projections"]``; for the guidance-distilled transformer (``guidance_embeds``) the embedded
    guidance ``extra["guidance"] = guidance_scale * 1000``. Latents are scaled by the VAE's ``scaling_factor``.

    Options:
        prompt_template: ``{"template": "...{}...", "crop_start": int}``; ``None`` is diffusers' default template.
        hidden_state_skip_layer: Llama layers skipped from the top (the pipeline's 2).
        guidance_scale: embedded guidance of the distilled model (the pipeline's default 6.0).
        pooled_max_sequence_length: CLIP prompt length (77).
    """

    name: str = "hunyuan_video"
    transformer_class: str = "HunyuanVideoTransformer3DModel"
    max_sequence_length: int = 256
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    prompt_template: dict[str, Any] | None = None
    hidden_state_skip_layer: int = 2
    guidance_scale: float = 6.0
    pooled_max_sequence_length: int = 77
    default_fps = 24.0  # HunyuanVideo's sample script writes 24 fps

    def __post_init__(self) -> None:
        template = self.prompt_template
        if template is None:
            return
        text = template.get("template") if isinstance(template, dict) else None
        crop = template.get("crop_start") if isinstance(template, dict) else None
        if not (isinstance(text, str) and "{}" in text and isinstance(crop, int) and crop >= 0):
            raise ValueError("prompt_template must be a dict with a 'template' string containing '{}' and an integer "
                             f"'crop_start' >= 0 (tokens cut before the prompt), got {template!r}")

    def set_timesteps_kwargs(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        return {"sigmas": np.linspace(1.0, 0.0, num_steps + 1)[:-1]}  # HunyuanVideoPipeline's

    def template(self) -> dict[str, Any]:
        if self.prompt_template is not None:
            return self.prompt_template
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        return DEFAULT_PROMPT_TEMPLATE

    def encode_prompts(self, bb: VideoBackbone, prompts: list[str]) -> Conditioning:
        template = self.template()
        crop = template["crop_start"]
        texts = [template["template"].format(p) for p in prompts]
        ids, mask = _tokenize(bb.tokenizer, texts, bb.max_sequence_length + crop, _device(bb.text_encoder))
        hidden = bb.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds, mask = hidden[-(self.hidden_state_skip_layer + 1)][:, crop:], mask[:, crop:]  # (b, l, d), (b, l)
        clip_ids, _ = _tokenize(bb.tokenizer_2, prompts, self.pooled_max_sequence_length, _device(bb.text_encoder_2))
        pooled = bb.text_encoder_2(clip_ids, output_hidden_states=False).pooler_output  # (b, d2); CLIP without mask
        dtype = bb.denoiser.dtype
        extra = {"pooled_projections": pooled.to(device=embeds.device, dtype=dtype)}
        if bb.denoiser.config.get("guidance_embeds", False):
            extra["guidance"] = torch.tensor([self.guidance_scale] * len(prompts), dtype=dtype,
                                             device=embeds.device) * 1000.0
        return Conditioning(prompt_embeds=embeds.to(dtype), prompt_mask=mask, extra=extra)

    def normalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        return latents * vae.config.scaling_factor

    def denormalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        return latents / vae.config.scaling_factor

    def call_transformer(self, bb, transformer, latents, timestep, cond):
        if cond.prompt_mask is None:
            raise ValueError("hunyuan_video conditioning needs prompt_mask (the Llama attention mask), got None")
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = _extra(cond, "guidance", self.name, "embedded guidance scale * 1000, Tensor[B]")
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                           encoder_attention_mask=cond.prompt_mask,
                           pooled_projections=_extra(cond, "pooled_projections", self.name, "CLIP pooled output"),
                           guidance=guidance, return_dict=False)[0]
