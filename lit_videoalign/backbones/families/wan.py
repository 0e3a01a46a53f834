"""Wan 2.1/2.2 (``WanPipeline``, ``WanImageToVideoPipeline``) as a model family of the diffusers backbone:
text-to-video, Wan 2.1 image-to-video and first-last-frame (image latents as extra input channels), and Wan 2.2
TI2V-5B (one model for both; ``expand_timesteps`` in ``model_index.json``: per-token timesteps and first-frame latent
replacement)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone  # bb: the DiffusersVideoBackbone calling
from lit_videoalign.backbones.families.base import (
    ModelFamily,
    _condition_channels,
    _device,
    _extra,
    _per_channel,
    _tokenize,
    _uint8_images,
)


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
        if _expands_timesteps(bb):
            return self._call_ti2v(bb, transformer, latents, timestep, cond)
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

    def _call_ti2v(self, bb, transformer, latents, timestep, cond):
        """Wan 2.2 TI2V (``expand_timesteps``), as ``WanPipeline`` and ``WanImageToVideoPipeline`` call it: one
        timestep per token ``(b, t' * h'/ph * w'/pw)``, and with an image (``extra["image_latents_first"]``, the
        normalised latents ``c`` of the image alone) latent frame 0 of the input replaced by ``c`` and its tokens at
        timestep 0.

        The pipeline steps frame 0 with an output it never feeds back and overwrites it with ``c`` at the end. Here
        frame 0's velocity is ``(x_t[frame 0] - c) / sigma`` (``sigma = timestep / 1000``), not the transformer's:
        the velocity of the straight path from ``c`` through ``x_t``, so every flow sampler keeps frame 0 on it (an
        Euler step to sigma 0 lands on ``c``, the pipeline's final frame 0) and sampling needs no hook. In training,
        with the clip's own first frame as the image (the causal VAE encodes it to the clip's latent frame 0, ``x0 =
        c`` there), ``x_t = (1 - sigma) c + sigma * noise`` makes this velocity ``noise - c``: exactly the
        flow-matching target, so frame 0 carries no loss and no gradient, with every objective unchanged. (With
        another image than the first frame, frame 0 adds ``|x0 - c|^2 / sigma^2`` to the loss, still without
        gradient. A scheduler whose model timesteps are rounded, as UniPC's integers are, sees ``sigma`` up to 1e-3
        off its own, which leaves frame 0 within about ``1e-3 * |noise - c|`` of ``c``.)"""
        b, _, t, h, w = latents.shape
        _, ph, pw = bb.patch_size
        first = cond.extra.get("image_latents_first")  # (b, z, 1, h', w') or None (text-to-video)
        given = torch.ones(t, h // ph, w // pw, device=latents.device)  # one per token; 0 on the image's tokens
        hidden = latents
        if first is not None:
            if first.shape[0] != b or first.shape[1:] != (latents.shape[1], 1, h, w):
                raise ValueError(f"the conditioning image encodes to latents {tuple(first.shape)} but the latents are "
                                 f"{tuple(latents.shape)}; encode the images at the video's height and width")
            first = first.to(latents.dtype)
            hidden = torch.cat([first, latents[:, :, 1:]], dim=2)
            given[0] = 0
        tokens = given.flatten()[None] * timestep.float()[:, None]  # (b, seq_len), as the pipeline's mask * t
        out = transformer(hidden_states=hidden, timestep=tokens, encoder_hidden_states=cond.prompt_embeds,
                          return_dict=False)[0]
        if first is None:
            return out
        sigma = (timestep.float() / 1000).view(b, 1, 1, 1, 1)
        positive = sigma > 0
        straight = torch.where(positive, (latents[:, :, :1].float() - first.float()) / torch.where(positive, sigma, 1),
                               0.0)  # sigma 0: frame 0 is c already; nothing left to move
        return torch.cat([straight.to(out.dtype), out[:, :, 1:]], dim=2)

    # images: Wan 2.1 I2V / FLF2V (``WanImageToVideoPipeline`` without ``expand_timesteps``), Wan 2.2 TI2V (with it)
    def supports_images(self, bb: VideoBackbone) -> bool:
        return _condition_channels(bb.denoiser) > 0 or _expands_timesteps(bb)

    def check_backbone(self, bb: VideoBackbone) -> None:
        extra = _condition_channels(bb.denoiser)
        config = bb.denoiser.config
        if _expands_timesteps(bb):
            if extra:
                raise ValueError(f"model_index.json sets expand_timesteps (Wan 2.2 TI2V) but the transformer takes "
                                 f"{config.in_channels} input channels for {config.out_channels} output channels; "
                                 "TI2V replaces the first latent frame and takes no image channels")
            if bb.vae is None:
                raise ValueError("model_index.json sets expand_timesteps (Wan 2.2 TI2V), which needs the pipeline's "
                                 "VAE to encode images; model_index.json has none")
            if bb.patch_size[0] != 1:
                raise ValueError(f"expand_timesteps (Wan 2.2 TI2V) gives one timestep per latent frame's tokens; the "
                                 f"transformer's patch size {bb.patch_size} groups {bb.patch_size[0]} frames")
            return
        if not extra:
            return
        # pixel space (no VAE, the toy world): frames are their own latents, one mask channel per frame
        ft, z = (1, config.out_channels) if bb.vae is None else (self.vae_compression(bb.vae)[0],
                                                                self.latent_channels(bb.vae))
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
        """As ``WanImageToVideoPipeline``: the VAE encodes the video ``[image, 0, ..., 0(, last)]`` (zeros are mid-
        grey in ``[-1, 1]``; in pixel space, without a VAE, those frames are the latents and each frame has one mask
        channel) to ``extra["image_latents"]`` ``(b, ft + z, t', h', w')``, a mask channel per pixel frame a latent
        frame covers (1 where the frame is given) before the normalised latents; with an image encoder, its
        penultimate hidden states of the image (FLF2V: of the first and last, in a row) ``(b, n or 2n, d)`` are
        ``extra["image_embeds"]``. The image encoder sees 8-bit pixels, as the pipeline sees a PIL image."""
        config, vae = bb.denoiser.config, bb.vae
        if _expands_timesteps(bb):
            return self._encode_first_frame(bb, images, last_images)
        pairs = config.image_dim is not None and config.pos_embed_seq_len is not None
        if pairs and last_images is None:
            raise ValueError("this Wan model is first-last-frame-to-video (FLF2V: pos_embed_seq_len="
                             f"{config.pos_embed_seq_len}); pass last_images as well as images")
        if last_images is not None and config.image_dim is not None and not pairs:
            raise ValueError("this Wan image-to-video model takes one image per video (no pos_embed_seq_len for a "
                             "first-last pair); got last_images")
        b, _, h, w = images.shape
        ft = 1 if vae is None else self.vae_compression(vae)[0]
        frames = images.new_zeros(b, images.shape[1], num_frames, h, w)  # (b, c, t, h, w) in [-1, 1]
        frames[:, :, 0] = images * 2 - 1
        if last_images is not None:
            frames[:, :, -1] = last_images * 2 - 1
        if vae is None:  # pixel space: the frames are the latents (as encode_videos gives them)
            device, latents = images.device, frames.float()
        else:
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

    def _encode_first_frame(self, bb: VideoBackbone, images: Tensor, last_images: Tensor | None) -> dict[str, Tensor]:
        """Wan 2.2 TI2V: the VAE encodes the image alone (one frame, ``[-1, 1]``) to its posterior mean, normalised:
        ``extra["image_latents_first"]`` ``(b, z, 1, h', w')``, the pipeline's ``latent_condition``."""
        if last_images is not None:
            raise ValueError("Wan 2.2 TI2V (expand_timesteps) is conditioned on the first frame only; got last_images "
                             "(its pipeline ignores a last_image)")
        vae = bb.vae
        frames = (images * 2 - 1).unsqueeze(2)  # (b, 3, 1, h, w)
        raw = vae.encode(frames.to(device=_device(vae), dtype=vae.dtype)).latent_dist.mode()
        return {"image_latents_first": self.normalize_latents(vae, raw.float())}


def _expands_timesteps(bb: VideoBackbone) -> bool:
    """Whether the pipeline is Wan 2.2 TI2V-style: ``"expand_timesteps": true`` in its ``model_index.json``."""
    return bool(bb.model_index.get("expand_timesteps"))
