"""HPSv2 (Wu et al., arXiv 2306.09341, "Human Preference Score v2"): an OpenCLIP ViT-H-14 fine-tuned on HPD v2.

``hpsv2`` scores a video as HPSv2 scores an image, frame by frame: the cosine between the L2-normalised image and
text embeddings (HPSv2's ``img_score.py`` takes the diagonal of ``image_features @ text_features.T`` of the
normalised OpenCLIP features, with no logit scale), averaged over ``num_frames`` evenly spread frames. This is how
DanceGRPO uses HPSv2.1 on videos. Frames are fitted to the 224x224 input as HPSv2 scores (its ``preprocess_val``
with ``light_augmentation``: longest side resized to 224, black padding to a square) in torch, so gradients reach
the pixels.

The published checkpoints (``HPS_v2.1_compressed.pt``, ``HPS_v2_compressed.pt``) are OpenCLIP state dicts, a pickle
format: :func:`read_openclip_checkpoint` reads them with ``torch.load(weights_only=True)`` and refuses anything but
tensors, and ``reward-zoo convert hpsv2 SRC DST`` (:func:`convert_hpsv2`) converts them once into a transformers
``CLIPModel`` held by this reward and written in our safetensors Hub layout with a model card. Scoring then goes
through the same CLIP path as ``pickscore`` and ``clip_score``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from reward_zoo.base import load_state_strict
from reward_zoo.pickscore import CLIP_H_PROCESSOR, CLIPPreference, check_num_frames
from reward_zoo.registry import register_reward

HPS_PAPER = "https://arxiv.org/abs/2306.09341"
HPS_REPO = "https://github.com/tgxs002/HPSv2"
HPS_REPO_REVISION = "866735ecaae999fa714bd9edfa05aa2672669ee3"  # the commit whose scoring and transforms we follow
HPS_WEIGHTS = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"
# OpenCLIP's ViT-H-14 (its model_configs/ViT-H-14.json): head counts are not in the state dict.
VIT_H_14_VISION_HEAD_WIDTH = 80
VIT_H_14_TEXT_HEADS = 16
# Buffers OpenCLIP may save that the transformers model computes itself (the causal mask).
IGNORED_KEYS = ("attn_mask",)
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}


def vit_h_14_config() -> dict[str, Any]:
    """``CLIPConfig`` arguments of OpenCLIP's ViT-H-14 (the HPSv2 architecture): 32 x 1280 vision layers (16 heads,
    patch 14, 224 px), 24 x 1024 text layers (16 heads, 77 tokens), 1024-d embeddings, exact GELU."""
    return {
        "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
        "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        "projection_dim": 1024,
    }


# -- reading and converting the published checkpoint -------------------------------------------------------------
def read_openclip_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The OpenCLIP state dict in a ``.pt``/``.pth`` file: a plain state dict or ``{"state_dict": ...}`` (what HPSv2
    publishes), keys optionally prefixed ``module.``. Read with ``torch.load(weights_only=True)``: no code runs.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds anything but a dict of tensors (naming the file and what it holds).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HPSv2 checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a checkpoint of tensors that torch.load(weights_only=True) can read: "
                         f"{first}; expected an OpenCLIP state dict (HPS_v2.1_compressed.pt)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected an OpenCLIP state dict (a dict of tensors, "
                         "or {'state_dict': {...}})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path} holds non-tensor entries (e.g. {bad[0]!r}: {type(obj[bad[0]]).__name__}); expected "
                         "an OpenCLIP state dict of tensors only")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if k not in IGNORED_KEYS}


def _need(state: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise ValueError(f"{source} is not an OpenCLIP ViT CLIP state dict: key {key!r} is missing")
    return state[key]


def _num_blocks(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and (m.group(1) or "") == prefix}
    return max(found) + 1 if found else 0


def clip_config_from_openclip(state: dict[str, Tensor], vision_head_width: int = VIT_H_14_VISION_HEAD_WIDTH,
                              text_heads: int = VIT_H_14_TEXT_HEADS, hidden_act: str = "gelu",
                              source: str = "state dict") -> dict[str, Any]:
    """``CLIPConfig`` arguments of an OpenCLIP ViT CLIP, read from its tensor shapes. Head counts are not in the state
    dict: the vision tower has ``width // vision_head_width`` heads, the text tower ``text_heads`` (ViT-H-14: 80 and
    16). ``hidden_act``: ``"gelu"`` (LAION models) or ``"quick_gelu"`` (OpenAI-trained ones)."""
    conv = _need(state, "visual.conv1.weight", source)  # (w, 3, p, p)
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((_need(state, "visual.positional_embedding", source).shape[0] - 1) ** 0.5))
    text_width = _need(state, "token_embedding.weight", source).shape[1]
    vocab = state["token_embedding.weight"].shape[0]
    if width % vision_head_width:
        raise ValueError(f"{source}: vision width {width} is not a multiple of vision_head_width {vision_head_width}")
    return {
        "vision_config": {"hidden_size": width,
                          "intermediate_size": _need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight",
                                                     source).shape[0],
                          "num_hidden_layers": _num_blocks(state, "visual."), "num_attention_heads":
                          width // vision_head_width, "image_size": grid * patch, "patch_size": patch,
                          "hidden_act": hidden_act},
        "text_config": {"vocab_size": vocab, "hidden_size": text_width,
                        "intermediate_size": _need(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
                        "num_hidden_layers": _num_blocks(state, ""), "num_attention_heads": text_heads,
                        "max_position_embeddings": _need(state, "positional_embedding", source).shape[0],
                        "hidden_act": hidden_act,
                        # OpenCLIP pools at argmax(token id): the end-of-text token, the last id of its vocabulary
                        "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1},
        "projection_dim": _need(state, "text_projection", source).shape[1],
    }


def convert_openclip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP ViT CLIP keys -> transformers ``CLIPModel`` keys: ``in_proj`` split into q/k/v, ``proj`` and
    ``text_projection`` transposed into linear weights. Keys it does not know are kept as they are, so a strict load
    names them."""
    out: dict[str, Tensor] = {}
    simple = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "logit_scale": "logit_scale"}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()  # (w, d) -> (d, w)
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith(("visual.ln_pre.", "visual.ln_post.", "ln_final.")):
            name, param = key.rsplit(".", 1)
            target = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                      "ln_final": "text_model.final_layer_norm"}[name]
            out[f"{target}.{param}"] = value
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base, rest = f"{tower}.encoder.layers.{m.group(2)}", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                param = "weight" if rest.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}.self_attn.{name}.{param}"] = chunk.contiguous()
            else:
                part, param = rest.rsplit(".", 1)
                out[f"{base}.{_BLOCK_PARTS.get(part, part)}.{param}"] = value
        else:
            out[key] = value
    return out


# -- the reward ----------------------------------------------------------------------------------------------------
@register_reward("hpsv2")
class HPSv2(CLIPPreference, paper_url=HPS_PAPER, repo_url=HPS_REPO):
    """HPSv2 of each sampled frame against the prompt, averaged: ``cos(image_embed, text_embed)`` in [-1, 1].

    HPSv2.1 scores generated images about 0.2-0.35; only differences between videos for one prompt carry meaning.
    The CLIP weights are this reward's own (``model.safetensors``), converted from the published checkpoint with
    ``reward-zoo convert hpsv2``; ``create_reward("hpsv2")`` builds the architecture with random weights.

    Args:
        clip_config: ``transformers.CLIPConfig`` arguments (default: OpenCLIP ViT-H-14, :func:`vit_h_14_config`).
        tokenizer_name_or_path: the CLIP tokenizer (OpenCLIP's ViT-H-14 uses OpenAI's BPE, as the LAION CLIP-H
            processor does).
        tokenizer_revision: Hub revision of the tokenizer.
        num_frames: score this many frames, evenly spread over the video (first and last included); None scores
            every frame.
    """

    license = "apache-2.0"  # the HPSv2 repository (code and the checkpoints it links to)
    score_ranges: ClassVar[dict[str, tuple[float, float]]] = {"preference": (-1.0, 1.0), "overall": (-1.0, 1.0)}
    expected_fps: ClassVar[float | None] = None  # frames sampled by index
    expected_resolution: ClassVar[tuple[int, int] | None] = (224, 224)  # after resizing the long side and padding

    def __init__(self, clip_config: dict[str, Any] | None = None, tokenizer_name_or_path: str = CLIP_H_PROCESSOR,
                 tokenizer_revision: str | None = None, num_frames: int | None = 8) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        self.num_frames = check_num_frames(num_frames)
        if clip_config is not None and not isinstance(clip_config, dict):
            raise ValueError(f"clip_config must be a dict of CLIPConfig arguments or None, got "
                             f"{type(clip_config).__name__}")
        clip = CLIPModel(CLIPConfig(**(clip_config or vit_h_14_config())))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path, revision=tokenizer_revision)
        eos = clip.config.text_config.eos_token_id
        if tokenizer.eos_token_id != eos:  # OpenCLIP pools the text at its end-of-text token
            raise ValueError(f"hpsv2: the tokenizer {tokenizer_name_or_path!r} ends prompts with token id "
                             f"{tokenizer.eos_token_id}, but the text tower pools at id {eos} (OpenCLIP's "
                             "end-of-text token); use the CLIP-H tokenizer the checkpoint was trained with")
        self.set_clip(clip, tokenizer, resize="pad", scale_by_logit=False)
        self.requires_grad_(False).eval()

    def load_clip_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> HPSv2:
        """Load transformers ``CLIPModel`` weights (e.g. from :func:`convert_openclip_state_dict`) strictly: every
        key of both towers present, no unknown key, every shape equal (``logit_scale`` is not used by HPSv2).

        Raises:
            ValueError: naming ``source`` and the first missing, unexpected or mis-shaped key.
        """
        ours = {}
        for key, value in state.items():
            if key.startswith(("vision_model.", "visual_projection.")):
                ours[f"image_encoder.{key}"] = value
            elif key.startswith(("text_model.", "text_projection.")):
                ours[f"text_encoder.{key}"] = value
            elif key != "logit_scale":
                ours[key] = value
        dtypes = {k: v.dtype for k, v in self.state_dict().items()}
        ours = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in ours.items()}
        load_state_strict(self, ours, f"{source} does not fit the CLIP config")
        return self

    @classmethod
    def from_openclip_checkpoint(cls, path: str | os.PathLike, vision_head_width: int = VIT_H_14_VISION_HEAD_WIDTH,
                                 text_heads: int = VIT_H_14_TEXT_HEADS, hidden_act: str = "gelu",
                                 **init_args) -> HPSv2:
        """Build the reward from a published HPSv2 ``.pt`` (an OpenCLIP state dict), read safely and converted."""
        state = read_openclip_checkpoint(path)
        config = clip_config_from_openclip(state, vision_head_width, text_heads, hidden_act, source=str(path))
        reward = cls(clip_config=config, **init_args)
        return reward.load_clip_state_dict(convert_openclip_state_dict(state), source=str(path)).eval()


def card_text(reward: HPSv2, source: str) -> str:
    """The markdown body of a converted HPSv2 checkpoint's model card."""
    vision = reward.image_encoder.vision_model.config
    return "\n".join([
        "# hpsv2", "",
        "HPSv2 (Human Preference Score v2, Wu et al., [arXiv 2306.09341](https://arxiv.org/abs/2306.09341)) as a "
        "`reward_zoo` reward: the cosine between OpenCLIP ViT-H-14 image and text embeddings fine-tuned on human "
        "preferences, scored per frame and averaged over sampled frames.", "",
        "```python", "from reward_zoo import create_reward", "",
        'reward = create_reward("hf-hub:ORG/REPO")  # or this folder', "scores = reward(videos, prompts)  "
        "# videos: [B, T, C, H, W] float in [0, 1]", "```", "",
        "## Source", "",
        f"- Converted from `{Path(source).name}` (HPSv2.1: {HPS_WEIGHTS}) by `reward-zoo convert hpsv2`.",
        f"- Repository: {HPS_REPO} (revision {HPS_REPO_REVISION}); paper: {HPS_PAPER}.", "",
        "## Scores", "",
        "- `preference` (= `overall`): cosine in [-1, 1]; HPSv2.1 gives generated images about 0.2-0.35.",
        "- Differentiable: yes (torch preprocessing, gradients reach the pixels).",
        f"- Input: any fps (frames sampled by index, `num_frames` = {reward.num_frames}); each frame resized so its "
        f"long side is {vision.image_size} and padded to {vision.image_size}x{vision.image_size}, as HPSv2 scores.",
        "",
        "## Parity", "",
        "On tiny random configs the converted model's embeddings equal a hand-written OpenCLIP forward of the source "
        "state dict (and OpenCLIP's own model where `open_clip` is installed) within float32 round-off: "
        "`python -m pytest tests/test_reward_hpsv2.py`.", "",
        "## Licence", "",
        "apache-2.0: the HPSv2 repository's licence. The weights are the authors'; check their terms before "
        "redistributing.", ""])


def convert_hpsv2(source: str | os.PathLike, destination: str | os.PathLike,
                  vision_head_width: int = VIT_H_14_VISION_HEAD_WIDTH, text_heads: int = VIT_H_14_TEXT_HEADS,
                  hidden_act: str = "gelu", **init_args) -> Path:
    """Convert a published HPSv2 checkpoint into our Hub layout (``config.json``, ``model.safetensors``, ``README.md``)
    at ``destination``, atomically: on any error nothing is written.

    Raises:
        FileExistsError: ``destination`` exists and is not empty.
        ValueError: the source holds non-tensors or does not fit the config derived from it (naming the file).
    """
    from huggingface_hub import ModelCard

    from lit_videoalign.video_io import atomic_dir

    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} exists and is not empty; choose a new folder for the converted reward")
    reward = HPSv2.from_openclip_checkpoint(source, vision_head_width, text_heads, hidden_act, **init_args)
    with atomic_dir(destination) as tmp:
        reward.save_pretrained(tmp)
        card = reward.generate_model_card()
        ModelCard(f"---\n{card.data.to_yaml()}\n---\n\n{card_text(reward, str(source))}").save(Path(tmp) / "README.md")
    return destination
