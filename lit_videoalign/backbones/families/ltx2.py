"""LTX-2 (``LTX2Pipeline``), video only, as a model family of the diffusers backbone.

LTX-2 is one audio-video transformer: a video stream and an audio stream, each with self-attention, text
cross-attention and a feed-forward, joined in every block by audio-to-video (a2v) and video-to-audio (v2a)
cross-attention. What runs where for the video path:

- **Text.** Gemma 3 (``text_encoder``) runs on the stripped prompt, left-padded to ``max_sequence_length`` with its
  mask; the hidden states of every layer (the embeddings and each block) are stacked to ``(b, l, d * (layers + 1))``.
  The frozen ``connectors`` (``LTX2TextConnectors``) normalise them per layer over the valid tokens, project them,
  and run a small 1-D transformer per stream whose learnable registers replace the padding; the video stream's output
  and the mask it returns (all ones when the connector has registers) are the prompt embeddings and mask here. The
  audio stream's output is computed (the connectors are one module) and dropped.
- **Latents.** ``AutoencoderKLLTX2Video`` posterior means, normalised ``(z - latents_mean) * scaling_factor /
  latents_std`` per channel, packed to tokens ``[B, T'H'W', C]`` for the transformer and unpacked after it.
- **Transformer.** ``LTX2VideoTransformer3DModel`` at ``timestep = sigma = 1000 * sigma`` (the pipeline passes the
  scheduler timestep as both), the latent grid ``(T', H', W')`` and ``fps = frame_rate / motion_speed`` for the video
  RoPE coordinates (pixel-frame times in seconds), the connector embeddings and mask. The transformer cannot run
  without an audio stream, so it gets the minimal one: a single zero audio token, zero audio text and
  ``isolate_modalities=True``, which turns a2v and v2a cross-attention off. With them off nothing of the audio stream
  reaches the video output (the video velocity is the same for any audio input); it is the video half of the
  pipeline's own modality-isolated pass (the one its modality guidance contrasts). It is *not* the main pass, which
  denoises audio jointly and lets the noisy audio reach the video through a2v: on a checkpoint whose a2v attention
  is not zero, video sampled here is LTX-2's prediction without audio, not the video half of an audio-video sample.
  The tests check both: our velocity equals the isolated transformer call on the pipeline's inputs, and on a
  transformer whose a2v output is zero, sampling equals ``LTX2Pipeline(..., output_type="latent")`` (CFG on and off;
  the pipeline run with ``stg_scale=0``, ``modality_scale=1``, ``guidance_rescale=0``, as the project's samplers do
  plain CFG; its default spatio-temporal and modality guidance are extra transformer passes).
- **Scheduler.** ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)`` with ``mu`` linear in the token count from
  ``base_shift`` (0.95) at ``base_image_seq_len`` (1024) to ``max_shift`` (2.05) at ``max_image_seq_len`` (4096).

Loaded: ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``connectors`` (a frozen component this family
loads itself: :attr:`ModelFamily.frozen_components`). Not loaded: ``audio_vae`` and ``vocoder`` (copied unchanged
when the backbone saves a pipeline, so the export still loads in ``LTX2Pipeline``), and the optional
``prompt_enhancer``/``processor``/``duration_head``.

What the audio branch would need to be trained (not done here):

1. **Audio data and latents.** Audio per clip (or per item in the data modules), the mel spectrogram at the audio
   VAE's ``sample_rate``/``mel_hop_length``/``mel_bins``, encoded by ``AutoencoderKLLTX2Audio`` to ``[B, 8, L, M']``
   latents, normalised by its ``latents_mean``/``latents_std``, packed ``[B, L, C * M']``; ``L`` follows the clip
   length (``round(seconds * sample_rate / hop_length / 4)``).
2. **A second latent stream in the contract.** Every objective and sampler carries one latent tensor; audio needs a
   pair (video, audio) or a packed joint state with its own noise, sigma (the transformer takes ``audio_timestep``
   and ``audio_sigma``), velocity target and loss weight, and the Euler/scheduler step for both (the pipeline steps a
   copy of the scheduler for audio).
3. **The joint call.** ``isolate_modalities=False`` with the audio connector embeddings, audio RoPE coordinates
   (``audio_rope.prepare_audio_coords``) and ``use_cross_timestep=True`` as the pipeline passes it; guidance with
   its own ``audio_guidance_scale``.
4. **Adapters.** LoRA on the audio stream (``audio_attn1``, ``audio_attn2``, ``audio_ff``) and the cross-modal
   ``audio_to_video_attn``/``video_to_audio_attn``; here the targets are the video stream's attention only
   (``attn1``/``attn2``: ``audio_attn1`` does not end in ``.attn1``), as an isolated video loss gives the audio
   stream and the cross-modal attention no gradient.
5. **Decoding and rewards.** ``audio_vae.decode`` then the ``vocoder`` to a waveform, muxed into the exported MP4,
   and audio(-video) rewards (sync, audio quality) in the reward zoo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
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
from lit_videoalign.backbones.families.ltx import pack_latents, unpack_latents

# the video stream's attention (``audio_attn1`` and ``audio_to_video_attn`` do not end in ``.attn1`` / ``.attn2``)
VIDEO_ATTENTION = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v",
                                                                                    "to_out.0"))


def ltx2_mu(config: Any, num_tokens: int) -> float:
    """``mu`` of ``LTX2Pipeline`` for ``num_tokens`` video tokens: linear from ``base_shift`` at
    ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``, with LTX-2's defaults (0.95 at 1024, 2.05 at
    4096) where the scheduler config has none."""
    base_len, max_len = config.get("base_image_seq_len", 1024), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.95), config.get("max_shift", 2.05)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return num_tokens * slope + base_shift - slope * base_len


@dataclass(frozen=True)
class LTX2Family(ModelFamily):
    """LTX-2 (``LTX2Pipeline``), video only: see the module docstring for what runs where and what the audio branch
    would need.

    Options:
        frame_rate: the ``frame_rate`` the pipeline is called with (its default, 24); the video is exported at it.
        motion_speed: the pipeline's ``motion_speed`` (1.0); RoPE sees ``frame_rate / motion_speed`` frames a second.
    """

    name: str = "ltx2"
    transformer_class: str = "LTX2VideoTransformer3DModel"
    max_sequence_length: int = 1024
    lora_targets: tuple[str, ...] = VIDEO_ATTENTION
    frame_rate: float = 24.0
    motion_speed: float = 1.0
    frozen_components = ("connectors",)  # loaded by load_component, frozen, saved with the pipeline
    copied_components = ("audio_vae", "vocoder")  # not loaded; copied unchanged into saved pipelines

    def __post_init__(self) -> None:
        for key in ("frame_rate", "motion_speed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{key} must be a positive number, got {value!r}")

    @property
    def default_fps(self) -> float:
        return float(self.frame_rate)

    def load_component(self, root: Path, index: dict, name: str, dtype: torch.dtype) -> nn.Module:
        """The text ``connectors`` of the pipeline folder ``root``: ``model_index.json`` names them
        ``["ltx2", "LTX2TextConnectors"]`` (a class of diffusers' LTX-2 pipeline package), which is what is loaded."""
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

        entry = index.get(name) or [None, None]
        if name != "connectors" or tuple(entry) not in (("ltx2", "LTX2TextConnectors"),
                                                        ("diffusers", "LTX2TextConnectors")):
            raise ValueError(f"pipeline {root} lists {name} as {entry} in model_index.json; an ltx2 pipeline needs "
                             "connectors = ['ltx2', 'LTX2TextConnectors']")
        if not (root / name / "config.json").is_file():
            raise FileNotFoundError(f"pipeline {root} has no {name}/config.json: model_index.json lists {name}, and "
                                    "an ltx2 pipeline needs its text connectors")
        return LTX2TextConnectors.from_pretrained(root, subfolder=name, torch_dtype=dtype)

    def check_backbone(self, bb: VideoBackbone) -> None:
        """Gemma pads on the left (the pipeline sets it before every call), the prompt length fills whole blocks of
        connector registers, and the transformer has no patches (``mu`` counts latent pixels)."""
        config = bb.denoiser.config
        if config.patch_size != 1 or config.patch_size_t != 1:
            raise ValueError(f"ltx2 supports transformers with patch_size 1 and patch_size_t 1 (LTX-2's), got "
                             f"{config.patch_size} and {config.patch_size_t}")
        for stream in ("video", "audio"):
            registers = bb.connectors.config.get(f"{stream}_connector_num_learnable_registers")
            if registers and bb.max_sequence_length % registers:
                raise ValueError(f"max_sequence_length must be a multiple of the {registers} learnable registers of "
                                 f"the {stream} text connector, got {bb.max_sequence_length}")
        bb.tokenizer.padding_side = "left"
        if bb.tokenizer.pad_token is None:
            bb.tokenizer.pad_token = bb.tokenizer.eos_token

    def set_timesteps_kwargs(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """``LTX2Pipeline``'s sigmas and ``mu`` of the token count ``t * h * w`` (passed whether or not the scheduler
        shifts dynamically, as the pipeline does)."""
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps),
                "mu": ltx2_mu(scheduler.config, math.prod(latent_shape[1:]))}

    def encode_prompts(self, bb: VideoBackbone, prompts: list[str]) -> Conditioning:
        texts = [p.strip() for p in prompts]
        ids, mask = _tokenize(bb.tokenizer, texts, bb.max_sequence_length, _device(bb.text_encoder))
        hidden = bb.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        stacked = torch.stack(hidden, dim=-1).flatten(2, 3).to(bb.text_encoder.dtype)  # (b, l, d * (layers + 1))
        embeds, _, mask = bb.connectors(stacked, mask, padding_side=bb.tokenizer.padding_side)  # video stream
        return Conditioning(prompt_embeds=embeds.to(bb.denoiser.dtype), prompt_mask=mask)

    def normalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        mean, std = _per_channel(vae.latents_mean, latents), _per_channel(vae.latents_std, latents)
        return (latents - mean) * vae.config.scaling_factor / std

    def denormalize_latents(self, vae: nn.Module, latents: Tensor) -> Tensor:
        mean, std = _per_channel(vae.latents_mean, latents), _per_channel(vae.latents_std, latents)
        return latents * std / vae.config.scaling_factor + mean

    def decode_vae(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """The pipeline's decode at its default ``decode_timestep`` 0 (no decode noise)."""
        temb = None
        if vae.config.timestep_conditioning:
            temb = torch.zeros(latents.shape[0], dtype=latents.dtype, device=latents.device)
        return vae.decode(latents, temb, return_dict=False)[0]

    def call_transformer(self, bb, transformer, latents, timestep, cond):
        b, _, t, h, w = latents.shape
        config = transformer.config
        audio = latents.new_zeros(b, 1, config.audio_in_channels)  # one silent audio token; isolated, it is unread
        text_width = config.caption_channels if config.use_prompt_embeddings else config.audio_cross_attention_dim
        audio_text = cond.prompt_embeds.new_zeros(b, 1, text_width)
        out = transformer(hidden_states=pack_latents(latents), audio_hidden_states=audio,
                          encoder_hidden_states=cond.prompt_embeds, audio_encoder_hidden_states=audio_text,
                          timestep=timestep, sigma=timestep, encoder_attention_mask=cond.prompt_mask,
                          num_frames=t, height=h, width=w, fps=self.frame_rate / self.motion_speed,
                          audio_num_frames=1, isolate_modalities=True, return_dict=False)[0]
        return unpack_latents(out, (t, h, w))  # (b, c, t, h, w)
