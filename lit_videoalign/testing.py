"""Tiny random-config pipelines written to disk, so tests and the toy world exercise the real loading code offline.

Every component is a real diffusers/transformers class at a tiny size, saved with ``save_pretrained`` in the exact
layout of a Hub pipeline (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``); the tokenizer is built offline from a word list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lit_videoalign.data.toyworld import VOCABULARY

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
) -> Path:
    """Write a Wan pipeline folder with random weights; ``vae=None`` makes a pixel-space pipeline.

    Args:
        path: output folder (created).
        transformer: ``WanTransformer3DModel`` config.
        text_encoder: ``UMT5Config`` arguments.
        vae: ``AutoencoderKLWan`` config, or None for pixel space.
        words: the tokenizer's vocabulary.
        seed: ``torch.manual_seed`` before each component, so the same call writes the same weights.
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
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"] if vae is not None else [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
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
