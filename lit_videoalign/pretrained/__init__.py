"""Pipelines shipped inside the package, loadable offline as ``builtin:NAME``.

``toyworld-base`` is the tiny pixel-space Wan text-to-video model pretrained on the toy world; ``toyworld-i2v`` is
it widened into an image-to-video model and fine-tuned on first frames. Their READMEs say how.
"""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent
TOYWORLD_BASE = PRETRAINED_DIR / "toyworld-base"
TOYWORLD_I2V = PRETRAINED_DIR / "toyworld-i2v"

# Architecture of the toy-world base: a real Wan 2.1 transformer at a tiny size, in pixel space (no VAE), on
# 16x32x32 RGB clips cut into (2, 4, 4) patches: 8 * 8 * 8 = 512 tokens per video.
TOYWORLD_TRANSFORMER = dict(patch_size=(2, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=3,
                            out_channels=3, text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
# Trained and sampled with sigmas shifted by 3: the high-noise steps, where a clip's layout and motion are decided,
# get most of the training (at shift 1 the base learned colours but not motion).
TOYWORLD_SHIFT = 3.0
TOYWORLD_TEXT_ENCODER = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def write_toyworld_init(path: str | Path, seed: int = 0) -> Path:
    """Write the untrained toy-world pipeline (random weights) that ``configs/toyworld/pretrain.yaml`` starts from."""
    from lit_videoalign.testing import write_wan_pipeline

    return write_wan_pipeline(path, transformer=TOYWORLD_TRANSFORMER, text_encoder=TOYWORLD_TEXT_ENCODER, vae=None,
                              seed=seed, shift=TOYWORLD_SHIFT)
