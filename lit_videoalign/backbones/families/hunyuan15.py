"""HunyuanVideo 1.5 text-to-video and image-to-video (``HunyuanVideo15Pipeline``,
``HunyuanVideo15ImageToVideoPipeline``, arXiv 2511.18870) as a model family of the diffusers backbone."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone  # bb: the DiffusersVideoBackbone calling
from lit_videoalign.backbones.families.base import ModelFamily, _device, _extra, _uint8_images

# Image tokens the T2V pipeline feeds the transformer as all-zero (hence masked) image embeddings: SigLIP's 27 x 27.
T2V_IMAGE_TOKENS = 729


def _pipeline_system_message() -> str:
    """The system message ``HunyuanVideo15Pipeline`` puts before every prompt (its ``system_message``), read from the
    installed diffusers so the two cannot drift apart."""
    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


@dataclass(frozen=True)
class HunyuanVideo15Family(ModelFamily):
    """HunyuanVideo 1.5 T2V (``HunyuanVideo15Pipeline``) and I2V (``HunyuanVideo15ImageToVideoPipeline``: a pipeline
    with an ``image_encoder``; the same transformer layout, see :meth:`encode_images`).

    Prompts: each prompt (an empty one as ``" "``) goes in a chat with the pipeline's system message, through the
    tokenizer's chat template with the generation prompt, padded to ``max_sequence_length + crop_start`` tokens; the
    Qwen2.5-VL text model's hidden states ``hidden_state_skip_layer`` layers below the top, with the first
    ``crop_start`` tokens (the system turn) cut off, are ``prompt_embeds`` with their mask. The glyph encoder (ByT5,
    ``text_encoder_2``) encodes the quoted texts of a prompt (``Text "..."``, as diffusers' ``extract_glyph_texts``
    finds them) into ``extra["glyph_embeds"]`` and ``extra["glyph_mask"]`` (``glyph_max_sequence_length`` tokens);
    a prompt without quotes gets zeros and an all-zero mask.

    The transformer takes the noisy latents channel-concatenated with condition latents and a mask, and image
    embeddings: for T2V all zero (the transformer masks zero image embeddings out); for I2V the image's latents in
    latent frame 0 with a mask of ones there, and the image encoder's tokens, in both branches of guidance. Latents are
    scaled by the VAE's ``scaling_factor``; the sampler's sigmas are ``linspace(1, 0, N + 1)[:-1]``, shifted by the
    scheduler. Guidance is classifier-free (the pipeline's guider; ``guidance_scale`` of the objective), with no
    embedded guidance.

    Options:
        crop_start: tokens of the templated system turn cut from the front (the pipeline's 108 for Qwen2.5-VL).
        hidden_state_skip_layer: text-model layers skipped from the top (the pipeline's 2).
        glyph_max_sequence_length: ByT5 tokens (the pipeline's 256).
        system_message: the chat's system message; None is the pipeline's.
    """

    name: str = "hunyuan_video15"
    transformer_class: str = "HunyuanVideo15Transformer3DModel"
    max_sequence_length: int = 1000
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    crop_start: int = 108
    hidden_state_skip_layer: int = 2
    glyph_max_sequence_length: int = 256
    system_message: str | None = None
    default_fps = 24.0  # the model card exports at 24 fps
    copied_components = ("guider",)  # saved pipelines keep the guider, which HunyuanVideo15Pipeline needs to load

    def __post_init__(self) -> None:
        for key in ("crop_start", "hidden_state_skip_layer", "glyph_max_sequence_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if "glyph" in key else 0):
                raise ValueError(f"{key} must be an integer >= {1 if 'glyph' in key else 0}, got {value!r}")
        if self.system_message is not None and not isinstance(self.system_message, str):
            raise ValueError(f"system_message must be a string or None (the pipeline's), got {self.system_message!r}")

    def set_timesteps_kwargs(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        return {"sigmas": np.linspace(1.0, 0.0, num_steps + 1)[:-1]}  # HunyuanVideo15Pipeline's

    # prompts
    def encode_prompts(self, bb: VideoBackbone, prompts: list[str]) -> Conditioning:
        embeds, mask = self._encode_text(bb, prompts)
        glyph, glyph_mask = self._encode_glyphs(bb, prompts)
        dtype = bb.denoiser.dtype
        extra = {"glyph_embeds": glyph.to(device=embeds.device, dtype=dtype),
                 "glyph_mask": glyph_mask.to(embeds.device)}
        return Conditioning(prompt_embeds=embeds.to(dtype), prompt_mask=mask, extra=extra)

    def _encode_text(self, bb: VideoBackbone, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Qwen2.5-VL hidden states ``(b, max_sequence_length, d)`` of the templated prompts and their mask."""
        system = self.system_message if self.system_message is not None else _pipeline_system_message()
        chats = [[{"role": "system", "content": system}, {"role": "user", "content": p or " "}] for p in prompts]
        tokens = bb.tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, tokenize=True, return_dict=True, padding="max_length",
            max_length=bb.max_sequence_length + self.crop_start, truncation=True, return_tensors="pt")
        device = _device(bb.text_encoder)
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = bb.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        crop = self.crop_start
        return hidden[-(self.hidden_state_skip_layer + 1)][:, crop:], mask[:, crop:]  # (b, l, d), (b, l)

    def _encode_glyphs(self, bb: VideoBackbone, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """ByT5 states ``(b, glyph_max_sequence_length, d2)`` of each prompt's quoted texts and their mask; zeros
        (and a zero mask) for a prompt without quotes."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

        encoder, length = bb.text_encoder_2, self.glyph_max_sequence_length
        device = _device(encoder)
        embeds = torch.zeros(len(prompts), length, encoder.config.d_model, device=device, dtype=encoder.dtype)
        mask = torch.zeros(len(prompts), length, dtype=torch.int64, device=device)
        glyphs = [extract_glyph_texts(p) for p in prompts]
        rows = [i for i, g in enumerate(glyphs) if g is not None]
        if rows:
            tokens = bb.tokenizer_2([glyphs[i] for i in rows], padding="max_length", max_length=length,
                                    truncation=True, add_special_tokens=True, return_tensors="pt").to(device)
            out = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.float())[0]
            embeds[rows], mask[rows] = out.to(embeds.dtype), tokens.attention_mask
        return embeds, mask

    # VAE
    def normalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        return latents * vae.config.scaling_factor

    def denormalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        return latents / vae.config.scaling_factor

    # transformer
    def check_backbone(self, bb: VideoBackbone) -> None:
        """Refuse a transformer whose input is not latents + condition latents + mask, and an image encoder whose
        tokens it cannot take; and have the VAE encode and decode one video at a time, as its causal attention mask
        (diffusers 0.42) does not broadcast over a batch."""
        if bb.vae is None:
            raise ValueError(f"a {self.name} pipeline needs its VAE (AutoencoderKLHunyuanVideo15); model_index.json "
                             "lists none")
        config, channels = bb.denoiser.config, self.latent_channels(bb.vae)
        if config.in_channels != 2 * channels + 1:
            raise ValueError(f"{self.transformer_class} has {config.in_channels} input channels; the T2V pipeline "
                             f"feeds 2 * {channels} + 1 (latents, condition latents and mask) for this VAE")
        if bb.image_encoder is not None:  # image-to-video
            width = bb.image_encoder.config.hidden_size
            if width != config.image_embed_dim:
                raise ValueError(f"the image encoder gives tokens of width {width} but {self.transformer_class} takes "
                                 f"image_embed_dim={config.image_embed_dim}; use the pipeline's own image_encoder")
            if config.use_meanflow:
                raise ValueError("this HunyuanVideo 1.5 I2V transformer has use_meanflow=True (step-distilled): its "
                                 "pipeline feeds the next step's timestep too, which a velocity at one sigma lacks; "
                                 "use a transformer with use_meanflow=False")
        bb.vae.use_slicing = True  # per-video: the same maths, and batches > 1 work

    def call_transformer(self, bb, transformer, latents, timestep, cond):
        if cond.prompt_mask is None:
            raise ValueError("hunyuan_video15 conditioning needs prompt_mask (the Qwen2.5-VL attention mask), got None")
        glyphs = _extra(cond, "glyph_embeds", self.name, "ByT5 glyph-text states, Tensor[B, L2, D2]")
        glyph_mask = _extra(cond, "glyph_mask", self.name, "ByT5 glyph-text mask, Tensor[B, L2]")
        b, c, t, h, w = latents.shape
        condition = latents.new_zeros(b, c + 1, t, h, w)  # condition latents (c channels) and mask (1); T2V: zeros
        if bb.image_encoder is None:
            image_embeds = latents.new_zeros(b, T2V_IMAGE_TOKENS, transformer.config.image_embed_dim)
        else:
            if "image_latents" not in cond.extra:
                raise ValueError("this HunyuanVideo 1.5 image-to-video pipeline needs a conditioning image per video; "
                                 "call backbone.encode_images(images, cond, num_frames=...)")
            first = cond.extra["image_latents"]  # (b, c, 1, h', w')
            if first.shape != (b, c, 1, h, w):
                raise ValueError(f"the conditioning images encode to latents {tuple(first.shape)} but the latents are "
                                 f"{tuple(latents.shape)}; encode the images at the video's height and width")
            image_embeds = _extra(cond, "image_embeds", self.name, "the image encoder's tokens, Tensor[B, N, D]")
            condition[:, :c, :1] = first.to(latents.dtype)  # the image in latent frame 0, zeros after it
            condition[:, c, 0] = 1  # the mask: latent frame 0 is given
        return transformer(hidden_states=torch.cat([latents, condition], dim=1), timestep=timestep.to(latents.dtype),
                           encoder_hidden_states=cond.prompt_embeds, encoder_attention_mask=cond.prompt_mask,
                           encoder_hidden_states_2=glyphs, encoder_attention_mask_2=glyph_mask,
                           image_embeds=image_embeds, return_dict=False)[0]

    # images: I2V (``HunyuanVideo15ImageToVideoPipeline``)
    def supports_images(self, bb: VideoBackbone) -> bool:
        return bb.image_encoder is not None

    def encode_images(self, bb: VideoBackbone, images: Tensor, num_frames: int,
                      last_images: Tensor | None) -> dict[str, Tensor]:
        """As ``HunyuanVideo15ImageToVideoPipeline``: the VAE encodes each image alone (one frame in ``[-1, 1]``) to
        its posterior mean, scaled: ``extra["image_latents"]`` ``(b, z, 1, h', w')``, which :meth:`call_transformer`
        puts in latent frame 0 of the condition channels. The SigLIP image encoder's last hidden states of the image,
        resized and normalised by its processor (the pipeline's ``feature_extractor``) from 8-bit pixels as from a PIL
        image, are ``extra["image_embeds"]`` ``(b, n, d)``. Latent frames after the first carry no image, so
        ``num_frames`` changes nothing here."""
        if last_images is not None:
            raise ValueError("HunyuanVideo 1.5 image-to-video is conditioned on the first frame only; got last_images "
                             "(its pipeline takes one image)")
        vae = bb.vae
        frames = (images * 2 - 1).unsqueeze(2)  # (b, 3, 1, h, w)
        raw = vae.encode(frames.to(device=_device(vae), dtype=vae.dtype)).latent_dist.mode()
        pixels = bb.image_processor(images=_uint8_images(images), do_resize=True, do_convert_rgb=True,
                                    return_tensors="pt").pixel_values
        encoder = bb.image_encoder
        embeds = encoder(pixel_values=pixels.to(_device(encoder), encoder.dtype)).last_hidden_state  # (b, n, d)
        return {"image_latents": self.normalize_latents(vae, raw.float()), "image_embeds": embeds}
