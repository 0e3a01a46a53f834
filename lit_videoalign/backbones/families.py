"""Model families of the diffusers backbone: how each diffusers pipeline (Wan 2.1/2.2, LTX-Video, HunyuanVideo)
encodes prompts, normalises VAE latents, calls its transformer and sets its scheduler's timesteps, so that
:class:`~lit_videoalign.backbones.diffusers.DiffusersVideoBackbone` reproduces that pipeline. A new family is one
subclass of :class:`ModelFamily` and one entry in ``FAMILIES``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone  # bb: the DiffusersVideoBackbone calling
from lit_videoalign.schedules.samplers import dynamic_shift_mu

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
    default_fps = 16.0  # frame rate the family's videos are exported at (not a field: the backbone's ``fps`` wins)

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


@dataclass(frozen=True)
class WanFamily(ModelFamily):
    """Wan 2.1/2.2 (``WanPipeline``): UMT5 with mask, padding embeddings zeroed; per-channel latent mean/std."""

    name: str = "wan"
    transformer_class: str = "WanTransformer3DModel"
    max_sequence_length: int = 512

    def encode_prompts(self, bb: VideoBackbone, prompts: list[str]) -> Conditioning:
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
        hidden, image_embeds = latents, None
        if _condition_channels(transformer):  # image-to-video: the image's latents and mask ride along as channels
            if "image_latents" not in cond.extra:
                raise ValueError(f"this Wan image-to-video model ({transformer.config.in_channels} input channels) "
                                 "needs conditioning images; call backbone.encode_images(images, cond, num_frames=...)")
            image_latents = cond.extra["image_latents"]  # (b, ft + z, t', h', w')
            if image_latents.shape[2:] != latents.shape[2:]:
                raise ValueError(f"the conditioning images encode to latents of size {tuple(image_latents.shape[2:])} "
                                 f"(t', h', w') but the latents are {tuple(latents.shape[2:])}; encode the images with "
                                 "the video's num_frames, height and width")
            hidden = torch.cat([latents, image_latents.to(latents.dtype)], dim=1)  # (b, z + ft + z, t', h', w')
            if transformer.config.image_dim is not None:
                image_embeds = _extra(cond, "image_embeds", self.name, "the image encoder's penultimate hidden states")
                if transformer.config.pos_embed_seq_len is not None:  # FLF2V: the transformer views (2b, n) as (b, 2n)
                    image_embeds = image_embeds.reshape(-1, image_embeds.shape[1] // 2, image_embeds.shape[2])
        return transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                           encoder_hidden_states_image=image_embeds, return_dict=False)[0]

    # images: Wan 2.1 I2V / FLF2V (``WanImageToVideoPipeline`` without ``expand_timesteps``)
    def supports_images(self, bb: VideoBackbone) -> bool:
        return _condition_channels(bb.denoiser) > 0

    def check_backbone(self, bb: VideoBackbone) -> None:
        extra = _condition_channels(bb.denoiser)
        if not extra:
            return
        config = bb.denoiser.config
        if bb.vae is None:
            raise ValueError(f"a Wan transformer with {config.in_channels} input channels for {config.out_channels} "
                             "output channels is image-to-video and needs the pipeline's VAE; model_index.json has "
                             "none")
        ft, z = self.vae_compression(bb.vae)[0], self.latent_channels(bb.vae)
        if extra != ft + z:
            raise ValueError(f"the Wan transformer takes {config.in_channels} input channels for "
                             f"{config.out_channels} output channels; image-to-video expects {config.out_channels} + "
                             f"{ft} mask + {z} image-latent channels ({config.out_channels + ft + z})")
        if config.image_dim is not None and bb.image_encoder is None:
            raise ValueError(f"the Wan transformer takes image-encoder tokens (image_dim={config.image_dim}) but the "
                             "pipeline has no image_encoder and image_processor in model_index.json")
        if config.image_dim is not None and config.added_kv_proj_dim is not None and bb.max_sequence_length != 512:
            raise ValueError(f"max_sequence_length must be 512 for this Wan image-to-video model, got "
                             f"{bb.max_sequence_length}: its attention splits the context into image tokens and "
                             "exactly 512 text tokens (diffusers' WanAttnProcessor)")

    def encode_images(self, bb: VideoBackbone, images: Tensor, num_frames: int,
                      last_images: Tensor | None) -> dict[str, Tensor]:
        """As ``WanImageToVideoPipeline``: the VAE encodes the video ``[image, 0, ..., 0(, last)]`` (zeros are mid-grey
        in ``[-1, 1]``) to ``extra["image_latents"]`` ``(b, ft + z, t', h', w')``, a mask channel per pixel frame a
        latent frame covers (1 where the frame is given) before the normalised latents; with an image encoder, its
        penultimate hidden states of the image (FLF2V: of the first and last, in a row) ``(b, n or 2n, d)`` are
        ``extra["image_embeds"]``. The image encoder sees 8-bit pixels, as the pipeline sees a PIL image."""
        config, vae = bb.denoiser.config, bb.vae
        pairs = config.image_dim is not None and config.pos_embed_seq_len is not None
        if pairs and last_images is None:
            raise ValueError("this Wan model is first-last-frame-to-video (FLF2V: pos_embed_seq_len="
                             f"{config.pos_embed_seq_len}); pass last_images as well as images")
        if last_images is not None and config.image_dim is not None and not pairs:
            raise ValueError("this Wan image-to-video model takes one image per video (no pos_embed_seq_len for a "
                             "first-last pair); got last_images")
        b, _, h, w = images.shape
        ft = self.vae_compression(vae)[0]
        frames = images.new_zeros(b, images.shape[1], num_frames, h, w)  # (b, c, t, h, w) in [-1, 1]
        frames[:, :, 0] = images * 2 - 1
        if last_images is not None:
            frames[:, :, -1] = last_images * 2 - 1
        device = _device(vae)
        raw = vae.encode(frames.to(device=device, dtype=vae.dtype)).latent_dist.mode()  # the posterior mean
        latents = self.normalize_latents(vae, raw.float())  # (b, z, t', h', w')
        t = latents.shape[2]
        given = torch.zeros(num_frames, device=device)
        given[0] = 1
        if last_images is not None:
            given[-1] = 1
        # Latent frame 0 encodes pixel frame 0 alone and each later one ft frames: frame 0's flag is repeated ft times,
        # so every latent frame has ft mask channels, one per pixel frame.
        given = torch.cat([given[:1].expand(ft), given[1:]]).view(t, ft).T  # (ft, t')
        mask = given[None, :, :, None, None].expand(b, ft, t, *latents.shape[3:])
        out = {"image_latents": torch.cat([mask, latents], dim=1)}
        if config.image_dim is not None:
            firsts = _uint8_images(images)
            listed = firsts if last_images is None else [x for pair in zip(firsts, _uint8_images(last_images))
                                                           for x in pair]
            pixels = bb.image_processor(images=listed, return_tensors="pt").pixel_values
            encoder = bb.image_encoder
            hidden = encoder(pixel_values=pixels.to(_device(encoder), encoder.dtype),
                             output_hidden_states=True).hidden_states[-2]  # (b or 2b, n, d)
            out["image_embeds"] = hidden.reshape(b, -1, hidden.shape[-1])
        return out


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


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (WanFamily(), LTXFamily(), HunyuanVideoFamily())}


def family_for(transformer_class: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.transformer_class == transformer_class:
            return family
    supported = {f.name: f.transformer_class for f in FAMILIES.values()}
    raise ValueError(f"transformer class {transformer_class!r} is not a supported family; supported: {supported}")
