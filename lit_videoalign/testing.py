"""Tiny random-config pipelines written to disk, so tests and the toy world exercise the real loading code offline.

Every component is a real diffusers/transformers class at a tiny size, saved with ``save_pretrained`` in the exact
layout of a Hub pipeline (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, and ``text_encoder_2/``, ``tokenizer_2/`` for HunyuanVideo); tokenizers are built offline from a word
list (``PreTrainedTokenizerFast`` is generic, so it stands in for T5, Llama and CLIP tokenizers alike).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lit_videoalign.data.toyworld import VOCABULARY
from reward_zoo.base import RewardModel

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5: pad 0, eos 1


def build_word_tokenizer(words: tuple[str, ...] | list[str] = VOCABULARY, model_max_length: int = 512):
    """A word-level fast tokenizer over ``words`` that appends ``</s>`` like T5's, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def write_wan_pipeline(
    path: str | os.PathLike,
    *,
    transformer: dict,
    text_encoder: dict,
    vae: dict | None,
    words: tuple[str, ...] | list[str] = VOCABULARY,
    seed: int = 0,
    shift: float = 1.0,
) -> Path:
    """Write a Wan pipeline folder with random weights; ``vae=None`` makes a pixel-space pipeline.

    Args:
        path: output folder (created).
        transformer: ``WanTransformer3DModel`` config.
        text_encoder: ``UMT5Config`` arguments.
        vae: ``AutoencoderKLWan`` config, or None for pixel space.
        words: the tokenizer's vocabulary.
        seed: ``torch.manual_seed`` before each component, so the same call writes the same weights.
        shift: the scheduler's sigma shift, which backbones take as their default sampling shift.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    WanTransformer3DModel(**transformer).save_pretrained(path / "transformer")
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(words)
    config = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                        **text_encoder)
    UMT5EncoderModel(config).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    if vae is not None:
        torch.manual_seed(seed)
        AutoencoderKLWan(**vae).save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(path / "scheduler")
    return _write_model_index(path, "WanPipeline", {
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"] if vae is not None else [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    })


def _write_model_index(path: Path, pipeline_class: str, components: dict[str, list]) -> Path:
    index = {"_class_name": pipeline_class, "_diffusers_version": __import__("diffusers").__version__, **components}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
TINY_TEXT_ENCODER = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def tiny_wan_pipeline(path: str | os.PathLike, *, pixel_space: bool = False, seed: int = 0) -> Path:
    """Write a complete tiny random Wan 2.1 pipeline to ``path`` (a few hundred kB; 9x32x32 clips -> 16x3x4x4).

    With ``pixel_space=True`` there is no VAE and the transformer works on RGB directly (3 channels, 16x32x32 clips).
    """
    transformer = dict(TINY_TRANSFORMER)
    if pixel_space:
        transformer.update(in_channels=3, out_channels=3, patch_size=(2, 4, 4))
    return write_wan_pipeline(path, transformer=transformer, text_encoder=TINY_TEXT_ENCODER,
                              vae=None if pixel_space else TINY_VAE, seed=seed)


TINY_LTX_TRANSFORMER = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=32)
# The real LTX-Video compression (1 + 8k frames, 32x32 pixels per latent) at 8 channels; timestep-conditioned decoder.
TINY_LTX_VAE = dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                    spatio_temporal_scaling=(True, True, True, False),
                    decoder_spatio_temporal_scaling=(True, True, True, False),
                    decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False,) * 4,
                    upsample_factor=(1,) * 4, timestep_conditioning=True, patch_size=4, patch_size_t=1,
                    scaling_factor=0.9)


def tiny_ltx_pipeline(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a complete tiny random LTX-Video pipeline to ``path`` (9x64x64 clips -> latents 8x2x2x2).

    Components: ``LTXVideoTransformer3DModel``, ``AutoencoderKLLTXVideo`` (non-trivial ``latents_mean``/``latents_std``
    and ``scaling_factor`` so normalisation is exercised), ``T5EncoderModel`` and a word-level tokenizer.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    LTXVideoTransformer3DModel(**TINY_LTX_TRANSFORMER).save_pretrained(path / "transformer")
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(model_max_length=128)
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      **TINY_TEXT_ENCODER)
    T5EncoderModel(config).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(**TINY_LTX_VAE)
    channels = TINY_LTX_VAE["latent_channels"]
    vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, channels))
    vae.latents_std.copy_(torch.linspace(0.5, 1.5, channels))
    vae.save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                    base_image_seq_len=1024, max_image_seq_len=4096).save_pretrained(path / "scheduler")
    return _write_model_index(path, "LTXPipeline", {
        "transformer": ["diffusers", "LTXVideoTransformer3DModel"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLLTXVideo"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    })


TINY_HUNYUAN_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
                                patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                rope_axes_dim=(2, 2, 4))
# The real HunyuanVideo compression (1 + 4k frames, 8x8 pixels per latent) at 4 channels.
TINY_HUNYUAN_VAE = dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True)
TINY_LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=512)
TINY_CLIP = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, projection_dim=8,
                 max_position_embeddings=77)
# The real template's crop_start (95) counts Llama-3 tokens; the word-level tokenizer needs its own template. Pass it
# as ``DiffusersVideoBackbone(path, family_options={"prompt_template": TINY_HUNYUAN_PROMPT_TEMPLATE})`` and to
# ``HunyuanVideoPipeline(prompt_template=...)``.
TINY_HUNYUAN_PROMPT_TEMPLATE = {"template": "describe the video : {}", "crop_start": 4}


def tiny_hunyuan_pipeline(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a complete tiny random HunyuanVideo pipeline to ``path`` (9x32x32 clips -> latents 4x3x4x4).

    Components: guidance-distilled ``HunyuanVideoTransformer3DModel``, ``AutoencoderKLHunyuanVideo``, ``LlamaModel``
    (``text_encoder``) and ``CLIPTextModel`` (``text_encoder_2``) with word-level tokenizers; use it with
    :data:`TINY_HUNYUAN_PROMPT_TEMPLATE`.
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = (*VOCABULARY, *TINY_HUNYUAN_PROMPT_TEMPLATE["template"].replace("{}", "").split())
    torch.manual_seed(seed)
    HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_TRANSFORMER).save_pretrained(path / "transformer")
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(words)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=1, **TINY_LLAMA)
    LlamaModel(config).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    torch.manual_seed(seed)
    tokenizer_2 = build_word_tokenizer(words, model_max_length=77)
    config_2 = CLIPTextConfig(vocab_size=len(tokenizer_2), pad_token_id=0, bos_token_id=1, eos_token_id=1, **TINY_CLIP)
    CLIPTextModel(config_2).save_pretrained(path / "text_encoder_2")
    tokenizer_2.save_pretrained(path / "tokenizer_2")
    torch.manual_seed(seed)
    AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE).save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(path / "scheduler")
    return _write_model_index(path, "HunyuanVideoPipeline", {
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "text_encoder": ["transformers", "LlamaModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    })


def write_tiny_clip(path: str | os.PathLike, seed: int = 0, image_size: int = 32):
    """Save a tiny random ``CLIPModel`` and a word-level tokenizer over the toy-world vocabulary to ``path``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(model_max_length=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1),  # pooled at the first </s>, which the word tokenizer appends
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


class Brightness(RewardModel):
    """Mean pixel value of each video: a differentiable reward that any policy can move in a few steps, so objective
    tests can check that training raises the reward they are given."""

    dimensions = ("brightness",)
    differentiable = True

    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4))  # (b,)
        return {"brightness": b, "overall": b}
