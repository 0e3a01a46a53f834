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
from reward_zoo.toyworld import SPECIAL_TOKENS, build_word_tokenizer  # noqa: F401  (the zoo owns the word tokenizer)


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


TINY_IMAGE_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)  # 17 tokens (16 patches and the class token) of width 32


def tiny_wan_i2v_pipeline(path: str | os.PathLike, *, image_encoder: bool = True, last_frame: bool = False,
                          seed: int = 0) -> Path:
    """Write a tiny random Wan 2.1 image-to-video pipeline (``WanImageToVideoPipeline``) to ``path``: 9x32x32 clips,
    a transformer with 16 + 4 mask + 16 image-latent input channels, and a ``CLIPVisionModel`` (32x32 images, 17
    tokens of width 32) with its ``CLIPImageProcessor`` as image encoder.

    Args:
        image_encoder: without one the transformer takes no image tokens (``image_dim=None``, as Wan 2.2 A14B I2V).
        last_frame: first-last-frame-to-video (FLF2V): the transformer takes the image tokens of the first and the
            last frame (``pos_embed_seq_len = 2 * 17``).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    transformer = dict(TINY_TRANSFORMER, in_channels=36)
    if image_encoder:
        width, tokens = TINY_IMAGE_ENCODER["hidden_size"], 1 + (32 // TINY_IMAGE_ENCODER["patch_size"]) ** 2
        inner = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
        transformer.update(image_dim=width, added_kv_proj_dim=inner,
                           pos_embed_seq_len=2 * tokens if last_frame else None)
    elif last_frame:
        raise ValueError("last_frame=True (FLF2V) needs image_encoder=True: FLF2V's first-last pair is image tokens")
    write_wan_pipeline(path, transformer=transformer, text_encoder=TINY_TEXT_ENCODER, vae=TINY_VAE, seed=seed)
    components = json.loads((path / "model_index.json").read_text())
    components = {k: v for k, v in components.items() if not k.startswith("_")}
    if image_encoder:
        torch.manual_seed(seed)
        CLIPVisionModel(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).save_pretrained(path / "image_encoder")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            path / "image_processor")
        components.update(image_encoder=["transformers", "CLIPVisionModel"],
                          image_processor=["transformers", "CLIPImageProcessor"])
    return _write_model_index(path, "WanImageToVideoPipeline", components)


def tiny_wan22_a14b_pipeline(path: str | os.PathLike, *, i2v: bool = False, boundary_ratio: float = 0.875,
                             seed: int = 0) -> Path:
    """Write a tiny random Wan 2.2 A14B pipeline to ``path``, laid out as ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``: two
    experts of one architecture, ``transformer`` (high noise, ``t >= boundary_ratio * 1000``) and ``transformer_2``
    (low noise), with different random weights. ``i2v=True``: the ``WanImageToVideoPipeline`` layout of
    ``Wan2.2-I2V-A14B`` (36 input channels, no image encoder, boundary 0.9 in the real one)."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if i2v:
        tiny_wan_i2v_pipeline(path, image_encoder=False, seed=seed)
    else:
        tiny_wan_pipeline(path, seed=seed)
    config = WanTransformer3DModel.load_config(path / "transformer")
    torch.manual_seed(seed + 1)  # another expert: other weights
    WanTransformer3DModel.from_config(config).save_pretrained(path / "transformer_2")
    components = json.loads((path / "model_index.json").read_text())
    components = {k: v for k, v in components.items() if not k.startswith("_")}
    components.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=boundary_ratio,
                      expand_timesteps=False)
    return _write_model_index(path, "WanImageToVideoPipeline" if i2v else "WanPipeline", components)


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


# A Qwen2-VL chat template in the layout of Qwen2-VL-Instruct's (user turn, video placeholder, generation prompt).
TINY_QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


def write_tiny_qwen2vl_processor(path: str | os.PathLike) -> Path:
    """Save a ``Qwen2VLProcessor`` with a byte-level BPE tokenizer (256 byte tokens, no merges, Qwen2-VL's special
    tokens at ids 256-262) and a Qwen2-VL-style chat template: what ``videoreward`` needs, built offline."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2VL_TOKENS)})
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_QWEN2VL_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return Path(path)


def tiny_qwen2vl_config(vocab_size: int = 266) -> dict:
    """A tiny ``Qwen2VLConfig`` (2 layers, hidden 32, vision depth 2) whose token ids match the tiny processor's; the
    default vocabulary is its 263 tokens plus VideoReward's 3 reward tokens."""
    ids = dict(zip(QWEN2VL_TOKENS, range(256, 256 + len(QWEN2VL_TOKENS))))
    return {
        "text_config": {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2,
                          "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
    }


TINY_REWARD_STATS = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
# A stand-in for VideoAlign's prompt template (which is not shipped here): written for these tests, with the
# generation prompt's field and the three reward tokens in VideoAlign's order.
TINY_VIDEOREWARD_TEMPLATE = ("Judge this clip on three counts.\nHow good do the frames look? <|VQ_reward|>\n"
                             "How well does it move? <|MQ_reward|>\nThe request was: {text_prompt}\n"
                             "How closely does it follow the request? <|TA_reward|>\n")


def write_tiny_videoreward(path: str | os.PathLike, seed: int = 0, output_dim: int = 1,
                           prompt_template: str = TINY_VIDEOREWARD_TEMPLATE) -> Path:
    """Save a tiny random ``VideoReward`` in the zoo's Hub layout (its processor in ``path/processor``), small
    frames (56 x 56 budget) so it scores a toy-world video in well under a second; its prompt is a stand-in
    template (:data:`TINY_VIDEOREWARD_TEMPLATE`), not VideoAlign's."""
    from reward_zoo.videoreward import VideoReward

    path = Path(path)
    processor = write_tiny_qwen2vl_processor(path / "processor")
    torch.manual_seed(seed)
    reward = VideoReward(model_config=tiny_qwen2vl_config(), processor_name_or_path=str(processor),
                         output_dim=output_dim, max_pixels=56 * 56, min_pixels=28 * 28,
                         reward_stats=TINY_REWARD_STATS, prompt_template=prompt_template)
    reward.save_pretrained(path)
    return path


def write_tiny_vlm_judge(path: str | os.PathLike, seed: int = 0, lm_gain: float = 15.0) -> Path:
    """Save a tiny random Qwen2-VL checkpoint with its processor (the tiny byte-level tokenizer plus "Yes" and "No" as
    whole tokens) for ``create_reward("vlm_judge", pretrained_model_name_or_path=path, min_pixels=784,
    max_pixels=3136)``; the LM head is scaled by ``lm_gain`` so its answer distributions are far from uniform."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    processor = AutoProcessor.from_pretrained(write_tiny_qwen2vl_processor(path))
    processor.tokenizer.add_tokens(["Yes", "No"])  # ids 263, 264 (the tiny config's vocabulary holds 266)
    processor.save_pretrained(path)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**tiny_qwen2vl_config()))
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_gain)
    model.save_pretrained(path)
    return path


class Brightness(RewardModel):
    """Mean pixel value of each video: a differentiable reward that any policy can move in a few steps, so objective
    tests can check that training raises the reward they are given."""

    dimensions = ("brightness",)
    differentiable = True

    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4))  # (b,)
        return {"brightness": b, "overall": b}


# Wan 2.2's VAE layout (Wan-AI/Wan2.2-TI2V-5B-Diffusers, vae/config.json): residual blocks, 2x2 pixel patches into 12
# channels, 48 latent channels, 1 + 4k frames and 16x16 pixels per latent; here with 4-channel blocks.
TINY_WAN22_VAE = dict(base_dim=4, decoder_base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                      temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                      latents_mean=[round(-0.3 + 0.6 * i / 47, 4) for i in range(48)],
                      latents_std=[round(0.5 + i / 47, 4) for i in range(48)])


def tiny_wan22_ti2v_pipeline(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.2 TI2V pipeline to ``path``: one model for text- and image-to-video, laid out as
    ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` (``WanPipeline`` with ``"expand_timesteps": true`` and no second expert), with
    a 48-channel transformer and :data:`TINY_WAN22_VAE` (9x64x64 clips -> latents 48x3x4x4, 2x2 tokens a frame).
    Its scheduler is FlowMatchEuler (the real one's is UniPC with ``flow_shift`` 5)."""
    path = Path(path)
    transformer = dict(TINY_TRANSFORMER, in_channels=48, out_channels=48)
    write_wan_pipeline(path, transformer=transformer, text_encoder=TINY_TEXT_ENCODER, vae=TINY_WAN22_VAE, seed=seed)
    components = json.loads((path / "model_index.json").read_text())
    components = {k: v for k, v in components.items() if not k.startswith("_")}
    components.update(transformer_2=[None, None], boundary_ratio=None, expand_timesteps=True)
    return _write_model_index(path, "WanPipeline", components)


TINY_HUNYUAN15_TRANSFORMER = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
                                  text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
                                  target_size=32, task_type="t2v")  # in: latents 4 + condition latents 4 + mask 1
# The real HunyuanVideo 1.5 compression (1 + 4k frames, 16x16 pixels per latent) at 4 channels.
TINY_HUNYUAN15_VAE = dict(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
                          spatial_compression_ratio=16, temporal_compression_ratio=4)
# A chat template in the layout of Qwen2.5-VL-Instruct's for text-only chats (system, user, generation prompt).
TINY_QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The pipeline's crop_start (108) counts Qwen2.5 tokens of its system turn; the tiny byte-level tokenizer spends one
# token per byte on it. Pass ``family_options={"crop_start": TINY_HUNYUAN15_CROP_START}`` to the backbone and set
# ``pipe.prompt_template_encode_start_idx`` to it on ``HunyuanVideo15Pipeline``.
TINY_HUNYUAN15_CROP_START = 493
# SigLIP at toy size: 16x16 pixels in 4x4 patches -> 16 tokens of the transformer's image_embed_dim (8).
TINY_SIGLIP = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                   patch_size=4)


def tiny_hunyuan15_pipeline(path: str | os.PathLike, *, i2v: bool = False, seed: int = 0) -> Path:
    """Write a complete tiny random HunyuanVideo 1.5 T2V pipeline (``HunyuanVideo15Pipeline``) to ``path``: 9x32x32
    clips -> latents 4x3x2x2. ``i2v=True``: the I2V pipeline (``HunyuanVideo15ImageToVideoPipeline``): the same
    components with ``task_type="i2v"``, plus a ``SiglipVisionModel`` image encoder and its ``SiglipImageProcessor``
    (saved as ``feature_extractor``, the pipeline's name); a 32x32 image keeps its size (``target_size`` 32).

    Components: ``HunyuanVideo15Transformer3DModel``, ``AutoencoderKLHunyuanVideo15``, ``Qwen2_5_VLTextModel`` with a
    byte-level ``Qwen2Tokenizer`` (256 byte tokens, no merges, a Qwen2.5-style chat template), the ByT5 glyph encoder
    (``T5EncoderModel``, ``ByT5Tokenizer``), the scheduler (shift 5, as the 480p model) and the guider; use it with
    :data:`TINY_HUNYUAN15_CROP_START`.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        Qwen2Tokenizer,
        T5Config,
        T5EncoderModel,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    HunyuanVideo15Transformer3DModel(**{**TINY_HUNYUAN15_TRANSFORMER, "task_type": "i2v" if i2v else "t2v"}
                                     ).save_pretrained(path / "transformer")
    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[],
                               pad_token="<|endoftext|>", padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TINY_QWEN25_CHAT_TEMPLATE
    tokenizer.save_pretrained(path / "tokenizer")
    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [1, 1, 2]},
                                  pad_token_id=ids[0], bos_token_id=ids[0], eos_token_id=ids[1])
    Qwen2_5_VLTextModel(config).save_pretrained(path / "text_encoder")
    tokenizer_2 = ByT5Tokenizer()
    tokenizer_2.save_pretrained(path / "tokenizer_2")
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                            decoder_start_token_id=0)).save_pretrained(path / "text_encoder_2")
    torch.manual_seed(seed)
    AutoencoderKLHunyuanVideo15(**TINY_HUNYUAN15_VAE).save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(path / "scheduler")
    ClassifierFreeGuidance(guidance_scale=6.0).save_pretrained(path / "guider")
    images = {}
    if i2v:
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(seed)
        SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(path / "image_encoder")
        SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path / "feature_extractor")
        images = {"image_encoder": ["transformers", "SiglipVisionModel"],
                  "feature_extractor": ["transformers", "SiglipImageProcessor"]}
    name = "HunyuanVideo15ImageToVideoPipeline" if i2v else "HunyuanVideo15Pipeline"
    return _write_model_index(path, name, {
        "transformer": ["diffusers", "HunyuanVideo15Transformer3DModel"],
        "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "ByT5Tokenizer"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo15"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "guider": ["diffusers", "ClassifierFreeGuidance"], **images,
    })


# LTX-2 at toy size: the real VAE compression (1 + 8k frames, 32x32 pixels per latent), 8 latent channels; Gemma 3
# with 2 layers of width 16 (3 hidden states: the connectors' text_proj_in_factor) and a tiny vision tower it never
# runs; connectors with 8 learnable registers (prompt lengths multiples of 8); an audio VAE of 2 x 4 mel latents (the
# transformer's 8 audio channels) and a vocoder, which only diffusers' pipeline runs.
TINY_LTX2_TRANSFORMER = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                             cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8,
                             audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                             num_layers=2, caption_channels=16)
TINY_LTX2_VAE = dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
                     layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), scaling_factor=0.8,
                     spatial_compression_ratio=32, temporal_compression_ratio=8)
TINY_GEMMA3_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, sliding_window=64)
TINY_LTX2_CONNECTORS = dict(caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                            video_connector_attention_head_dim=8, video_connector_num_layers=1,
                            video_connector_num_learnable_registers=8, audio_connector_num_attention_heads=2,
                            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
                            audio_connector_num_learnable_registers=8, connector_rope_base_seq_len=64)


def tiny_ltx2_pipeline(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a complete tiny random LTX-2 pipeline to ``path`` (9x64x64 clips -> latents 8x2x2x2), loadable here
    (video only) and by ``LTX2Pipeline.from_pretrained``.

    Components: ``LTX2VideoTransformer3DModel``, ``AutoencoderKLLTX2Video`` (non-trivial ``latents_mean``/
    ``latents_std`` and ``scaling_factor``), ``Gemma3ForConditionalGeneration`` with a word-level tokenizer,
    ``LTX2TextConnectors``, ``AutoencoderKLLTX2Audio``, ``LTX2Vocoder`` and LTX-2's dynamically shifted scheduler.
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    LTX2VideoTransformer3DModel(**TINY_LTX2_TRANSFORMER).save_pretrained(path / "transformer")
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(model_max_length=128)
    text = dict(TINY_GEMMA3_TEXT, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    Gemma3ForConditionalGeneration(config).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    torch.manual_seed(seed)
    LTX2TextConnectors(**TINY_LTX2_CONNECTORS).save_pretrained(path / "connectors")
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(**TINY_LTX2_VAE)
    channels = TINY_LTX2_VAE["latent_channels"]
    vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, channels))
    vae.latents_std.copy_(torch.linspace(0.5, 1.5, channels))
    vae.save_pretrained(path / "vae")
    torch.manual_seed(seed)
    AutoencoderKLLTX2Audio(base_channels=8, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=2,
                           mel_bins=16).save_pretrained(path / "audio_vae")
    LTX2Vocoder(in_channels=8, hidden_channels=8, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
                resnet_kernel_sizes=[3], resnet_dilations=[[1]]).save_pretrained(path / "vocoder")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                    base_image_seq_len=1024, max_image_seq_len=4096,
                                    shift_terminal=0.1).save_pretrained(path / "scheduler")
    return _write_model_index(path, "LTX2Pipeline", {
        "transformer": ["diffusers", "LTX2VideoTransformer3DModel"],
        "text_encoder": ["transformers", "Gemma3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "connectors": ["ltx2", "LTX2TextConnectors"],
        "vae": ["diffusers", "AutoencoderKLLTX2Video"],
        "audio_vae": ["diffusers", "AutoencoderKLLTX2Audio"],
        "vocoder": ["ltx2", "LTX2Vocoder"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    })
