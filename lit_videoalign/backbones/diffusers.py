"""Diffusers video pipelines as backbones: Wan 2.1/2.2, LTX-Video, HunyuanVideo; a family is one entry in ``FAMILIES``.

Loading goes through the real ``from_pretrained`` of diffusers and transformers, component by component, from a
diffusers pipeline folder or Hub id (``model_index.json`` plus ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` and, for HunyuanVideo, ``text_encoder_2/``, ``tokenizer_2/``). Only classes from diffusers and
transformers are ever instantiated, weights are read from safetensors, and no remote code runs (the finding and
loading helpers are in :mod:`lit_videoalign.backbones.loading`).

Each family reproduces its diffusers pipeline: how prompts are encoded, how VAE latents are normalised, and how the
transformer is called. All three pipelines sample with ``FlowMatchEulerDiscreteScheduler``, whose deterministic step is
``prev_sample = sample + (sigma_next - sigma) * model_output`` at ``timestep = sigma * num_train_timesteps`` (1000): the
transformer's output *is* the velocity ``noise - x0`` of the project's convention, at timestep ``sigma * 1000`` (the
tests check one pipeline step against :meth:`DiffusersVideoBackbone.predict_velocity` for every family).

A pipeline whose ``model_index.json`` has no VAE (``"vae": [null, null]``) is a **pixel-space** model: latents are
the video itself rescaled to ``[-1, 1]`` as ``[B, C, T, H, W]``. The shipped toy-world base is one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone
from lit_videoalign.backbones.loading import (  # noqa: F401  (re-exported: their old home was this module)
    _DTYPES,
    _QUANTIZATIONS,
    ALLOWED_LIBRARIES,
    BUILTIN_DIR,
    BUILTIN_PREFIX,
    _component_class,
    _load_quantized,
    _scheduler_shift,
    component_classes,
    resolve_pretrained_path,
)
from lit_videoalign.errors import shorten
from lit_videoalign.schedules.flow import _broadcast
from lit_videoalign.video_io import atomic_dir, check_video

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


# -- families ----------------------------------------------------------------------------------------------------------
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

    # prompts
    def encode_prompts(self, bb: DiffusersVideoBackbone, prompts: list[str]) -> Conditioning:
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
    def call_transformer(self, bb: DiffusersVideoBackbone, transformer: nn.Module, latents: Tensor, timestep: Tensor,
                         cond: Conditioning) -> Tensor:
        """Run ``transformer`` on ``[B, C, T', H', W']`` latents with diffusers timesteps ``[B]``; same layout out."""
        raise NotImplementedError(f"model family {self.name!r} has no transformer call")


@dataclass(frozen=True)
class WanFamily(ModelFamily):
    """Wan 2.1/2.2 (``WanPipeline``): UMT5 with mask, padding embeddings zeroed; per-channel latent mean/std."""

    name: str = "wan"
    transformer_class: str = "WanTransformer3DModel"
    max_sequence_length: int = 512

    def encode_prompts(self, bb: DiffusersVideoBackbone, prompts: list[str]) -> Conditioning:
        ids, mask = _tokenize(bb.tokenizer, prompts, bb.max_sequence_length, _device(bb.text_encoder))
        embeds = bb.text_encoder(ids, attention_mask=mask).last_hidden_state  # (b, l, d)
        embeds = embeds.to(bb.denoiser.dtype)
        # The pipeline cuts each prompt at its length and re-pads with zeros: the transformer gets no mask.
        embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return Conditioning(prompt_embeds=embeds, prompt_mask=mask)

    def latent_channels(self, vae: nn.Module) -> int:
        return vae.config.z_dim

    def vae_compression(self, vae: nn.Module) -> tuple[int, int]:
        return vae.config.get("scale_factor_temporal", 4), vae.config.get("scale_factor_spatial", 8)

    def normalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        mean, std = _per_channel(vae.config.latents_mean, latents), _per_channel(vae.config.latents_std, latents)
        return (latents - mean) / std

    def denormalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        mean, std = _per_channel(vae.config.latents_mean, latents), _per_channel(vae.config.latents_std, latents)
        return latents * std + mean

    def call_transformer(self, bb, transformer, latents, timestep, cond):
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                           return_dict=False)[0]


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

    def encode_prompts(self, bb: DiffusersVideoBackbone, prompts: list[str]) -> Conditioning:
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

    def __post_init__(self) -> None:
        template = self.prompt_template
        if template is None:
            return
        text = template.get("template") if isinstance(template, dict) else None
        crop = template.get("crop_start") if isinstance(template, dict) else None
        if not (isinstance(text, str) and "{}" in text and isinstance(crop, int) and crop >= 0):
            raise ValueError("prompt_template must be a dict with a 'template' string containing '{}' and an integer "
                             f"'crop_start' >= 0 (tokens cut before the prompt), got {template!r}")

    def template(self) -> dict[str, Any]:
        if self.prompt_template is not None:
            return self.prompt_template
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        return DEFAULT_PROMPT_TEMPLATE

    def encode_prompts(self, bb: DiffusersVideoBackbone, prompts: list[str]) -> Conditioning:
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


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (WanFamily(), LTXFamily(), HunyuanVideoFamily())}


def family_for(transformer_class: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.transformer_class == transformer_class:
            return family
    supported = {f.name: f.transformer_class for f in FAMILIES.values()}
    raise ValueError(f"transformer class {transformer_class!r} is not a supported family; supported: {supported}")


class DiffusersVideoBackbone(VideoBackbone):
    """A diffusers text-to-video pipeline (Wan, LTX-Video, HunyuanVideo) as a :class:`VideoBackbone`.

    The family is recognised from the transformer class in ``model_index.json``. Everything but the denoiser is frozen
    and kept in eval mode.

    Args:
        pretrained_model_name_or_path: a pipeline folder, a Hub id (``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"``,
            ``"Lightricks/LTX-Video"``, ``"hunyuanvideo-community/HunyuanVideo"``) or ``"builtin:toyworld-base"`` for a
            pipeline shipped with this package.
        revision: Hub revision (branch, tag or commit) to pin.
        max_sequence_length: prompt length in tokens; defaults to the family's (Wan 512, LTX 128, Hunyuan 256).
        torch_dtype: dtype of the denoiser weights (``"float32"``, ``"bfloat16"``, ``"float16"``).
        frozen_dtype: dtype of the frozen VAE and text encoders.
        reinit_denoiser: re-initialise the denoiser from its config (pretraining from scratch); uses the global seed.
        gradient_checkpointing: recompute transformer blocks in the backward pass.
        family_options: family settings that are pipeline call arguments in diffusers, e.g. ``{"frame_rate": 24}``
            (LTX) or ``{"guidance_scale": 1.0, "prompt_template": {...}}`` (HunyuanVideo); see the family classes.
        quantization: ``"nf4"`` or ``"fp4"`` loads the denoiser's linear layers in 4 bits through diffusers'
            ``BitsAndBytesConfig`` (computing in ``torch_dtype``) as the frozen base of a LoRA adapter (QLoRA,
            arXiv 2305.14314); None loads full weights. Needs bitsandbytes; diffusers loads it on an accelerator.
        compile_blocks: ``torch.compile`` the transformer blocks when training starts (in ``configure_model``, after
            any sharding).
        strict_prompts: refuse prompts longer than ``max_sequence_length`` tokens; by default they are truncated as
            the pipeline does, with one warning per backbone giving the count.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        max_sequence_length: int | None = None,
        torch_dtype: str = "float32",
        frozen_dtype: str = "float32",
        reinit_denoiser: bool = False,
        gradient_checkpointing: bool = False,
        family_options: dict[str, Any] | None = None,
        quantization: str | None = None,
        compile_blocks: bool = False,
        strict_prompts: bool = False,
    ) -> None:
        super().__init__()
        if quantization is not None and quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(_QUANTIZATIONS)} or None, got {quantization!r}")
        if quantization is not None and reinit_denoiser:
            raise ValueError("quantization needs pretrained weights to quantize; it cannot be combined with "
                             "reinit_denoiser=True")
        self.compile_blocks, self.strict_prompts, self._warned_truncation = compile_blocks, strict_prompts, False
        for key, value in (("torch_dtype", torch_dtype), ("frozen_dtype", frozen_dtype)):
            if value not in _DTYPES:
                raise ValueError(f"{key} must be one of {list(_DTYPES)}, got {value!r}")
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        root = resolve_pretrained_path(pretrained_model_name_or_path, revision)
        self._root = root
        index = json.loads((root / "model_index.json").read_text())
        self.model_index = index
        if not (index.get("transformer") or [None])[0]:
            raise ValueError(f"pipeline {root} lacks required components ['transformer'] in model_index.json")
        self.family = family_for(index["transformer"][1]).with_options(family_options)
        classes = component_classes(root, index, self.family.name, self.family.components)  # before loading any

        dtype, frozen = _DTYPES[torch_dtype], _DTYPES[frozen_dtype]
        transformer_cls = classes["transformer"]
        if reinit_denoiser:
            config = transformer_cls.load_config(root, subfolder="transformer")
            self.denoiser = transformer_cls.from_config(config)
            if dtype != torch.float32:
                self.denoiser = self.denoiser.to(dtype)
        elif quantization is not None:
            self.denoiser = _load_quantized(transformer_cls, root, quantization, dtype)
        else:
            self.denoiser = transformer_cls.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        self.default_lora_targets = self.family.lora_targets
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

        for te, tok in self.family.text_pairs:  # text_encoder, tokenizer (, text_encoder_2, tokenizer_2)
            setattr(self, te, classes[te].from_pretrained(root, subfolder=te, torch_dtype=frozen))
            getattr(self, te).requires_grad_(False).eval()
            setattr(self, tok, classes[tok].from_pretrained(root, subfolder=tok))
        if "vae" in classes:
            self.vae = classes["vae"].from_pretrained(root, subfolder="vae", torch_dtype=frozen)
            self.vae.requires_grad_(False).eval()
        else:
            self.vae = None
        self.max_sequence_length = max_sequence_length or self.family.max_sequence_length
        self.default_sampling_shift = _scheduler_shift(root)
        patch, patch_t = self.denoiser.config.get("patch_size", (1, 1, 1)), self.denoiser.config.get("patch_size_t", 1)
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (patch_t or 1, patch, patch)
        # from_pretrained returns modules in eval mode and Lightning keeps submodule modes as it finds them, so put
        # the denoiser in this module's mode explicitly: it trains in train mode (dropout, LoRA dropout active).
        self.train(self.training)

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def is_quantized(self) -> bool:
        """Whether the denoiser's base weights are bitsandbytes-quantized (train only LoRA on it)."""
        return bool(getattr(self.denoiser, "is_quantized", False))

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, te) for te in self.family.text_encoders]

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """``_no_split_modules`` of the denoiser, or its ``_repeated_blocks`` where it has none (LTX-Video)."""
        found = super().block_classes
        if found:
            return found
        names = set(getattr(self.denoiser, "_repeated_blocks", None) or ())
        return tuple(sorted({type(m) for m in self.denoiser.modules() if type(m).__name__ in names},
                            key=lambda c: c.__name__))

    def train(self, mode: bool = True) -> DiffusersVideoBackbone:
        """Only the denoiser follows train mode; the frozen components stay in eval."""
        super().train(mode)
        for text_encoder in self.text_encoders:
            text_encoder.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    # -- prompts --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Tokenise to ``max_sequence_length`` and run the frozen text encoder(s) as the family's pipeline does.

        Returns embeds ``(b, l, d)`` in the denoiser's dtype, the token mask ``(b, l)`` and family extras
        (HunyuanVideo: ``extra["pooled_projections"]`` and ``extra["guidance"]``).
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; expected at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a string, got {shorten(bad[0])}")
        self._check_prompt_lengths(prompts)
        return self.family.encode_prompts(self, list(prompts))

    def _check_prompt_lengths(self, prompts: list[str]) -> None:
        """Refuse (``strict_prompts``) or warn once about prompts longer than ``max_sequence_length`` tokens."""
        if self._warned_truncation and not self.strict_prompts:
            return
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        long = [(n, p) for n, p in zip(lengths, prompts) if n > self.max_sequence_length]
        if not long:
            return
        n, prompt = max(long, key=lambda x: x[0])
        what = (f"{len(long)} of {len(prompts)} prompts are longer than max_sequence_length={self.max_sequence_length} "
                f"tokens (the longest, {n} tokens: {shorten(prompt)})")
        if self.strict_prompts:
            raise ValueError(f"{what}; shorten them or raise max_sequence_length (strict_prompts=True)")
        self._warned_truncation = True
        warnings.warn(f"{what} and are truncated to {self.max_sequence_length} tokens, as the pipeline does; shorten "
                      "them, raise max_sequence_length, or set strict_prompts=True to refuse them (warned once)",
                      UserWarning, stacklevel=3)

    # -- videos and latents ---------------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        pt, ph, pw = self.patch_size
        if self.vae is None:
            t, h, w, c = num_frames, height, width, self.denoiser.config.in_channels
        else:
            ft, fs = self.family.vae_compression(self.vae)
            if (num_frames - 1) % ft:
                raise ValueError(f"num_frames must be 1 + {ft}k for this VAE, got {num_frames}")
            if height % fs or width % fs:
                raise ValueError(f"height and width must be multiples of {fs} for this VAE, got {height}x{width}")
            t, h, w, c = (num_frames - 1) // ft + 1, height // fs, width // fs, self.family.latent_channels(self.vae)
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size {t}x{h}x{w} for {num_frames}x{height}x{width} frames is not divisible by "
                             f"the transformer patch size {self.patch_size}")
        return (c, t, h, w)

    def encode_videos(self, videos: Tensor) -> Tensor:
        check_video(videos, batched=True, name="videos")
        x = videos.permute(0, 2, 1, 3, 4) * 2 - 1  # (b, c, t, h, w) in [-1, 1]
        self.latent_shape(videos.shape[1], videos.shape[3], videos.shape[4])
        if self.vae is None:
            return x.to(self.denoiser.dtype)
        with torch.no_grad():
            latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()  # deterministic: the posterior mean
            return self.family.normalize_latents(self.vae, latents).to(self.denoiser.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape [B, C, T', H', W'], got shape {tuple(latents.shape)}")
        if self.vae is None:
            x = latents.float()
        else:
            z = self.family.denormalize_latents(self.vae, latents.to(self.vae.dtype))
            x = self.family.decode_vae(self.vae, z).float()  # differentiable: reward gradients flow through
        # The decoder's range is [-1, 1] only approximately; map to [0, 1] the way diffusers' postprocessing does.
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()  # (b, t, c, h, w)

    # -- denoiser -------------------------------------------------------------------------------------------------
    def predict_velocity(self, latents: Tensor, sigma: float | Tensor, cond: Conditioning,
                         denoiser: nn.Module | None = None) -> Tensor:
        """Velocity ``noise - x0`` at ``(latents, sigma)``; the transformer sees ``timestep = sigma * 1000``.

        The transformer is called exactly as the family's diffusers pipeline calls it (LTX: packed tokens, unpacked
        here); the output is in the latent layout ``[B, C, T', H', W']``.

        Args:
            latents: ``[B, C, T', H', W']``.
            sigma: float or ``Tensor[B]`` in ``[0, 1]``.
            cond: from :meth:`encode_prompts`, batch ``B``.
            denoiser: another module of the same architecture to run instead (e.g. a frozen reference copy).
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape [B, C, T', H', W'], got shape {tuple(latents.shape)}")
        if len(cond) != latents.shape[0]:
            raise ValueError(f"conditioning batch {len(cond)} does not match latents batch {latents.shape[0]}")
        model = denoiser if denoiser is not None else self.denoiser
        b = latents.shape[0]
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        if sigma_t.ndim == 0:
            sigma_t = sigma_t.expand(b)
        _broadcast(sigma_t, latents)  # validates the shape
        timestep = sigma_t * 1000
        out = self.family.call_transformer(self, model, latents.to(model.dtype), timestep, cond.to(dtype=model.dtype))
        return out.to(latents.dtype)

    # -- saving ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, merge_lora: bool = True) -> Path:
        """Write the whole pipeline as a diffusers folder (safetensors), atomically.

        With a LoRA adapter attached, the adapter is merged into a copy of the denoiser (``merge_lora=True``) or
        saving is refused, so the folder always loads as a plain pipeline.
        """
        path = Path(path)
        denoiser = self.denoiser
        if self.has_lora:
            if not merge_lora:
                raise ValueError("the denoiser has a LoRA adapter; pass merge_lora=True to save merged weights")
            denoiser = copy.deepcopy(self.denoiser)
            denoiser.fuse_lora()
            denoiser.unload_lora()
        with atomic_dir(path) as tmp:
            denoiser.save_pretrained(tmp / "transformer", safe_serialization=True)
            for te, tok in self.family.text_pairs:
                getattr(self, te).save_pretrained(tmp / te, safe_serialization=True)
                getattr(self, tok).save_pretrained(tmp / tok)
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            index = dict(self.model_index)
            index["transformer"] = ["diffusers", type(denoiser).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            for extra in ("scheduler",):
                src = self._root / extra
                if src.is_dir():
                    shutil.copytree(src, tmp / extra)
        return path
