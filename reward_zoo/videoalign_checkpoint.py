"""VideoAlign checkpoints for ``videoreward``: reading the published folder and converting it to the zoo's Hub layout.

VideoAlign (github.com/KlingAIResearch/VideoAlign) saves ``model_config.json`` (its data, model, LoRA and inference
configs) and ``checkpoint-N/`` folders holding either ``model.pth`` (the full state dict) or
``adapter_model.safetensors`` (LoRA of the language model) plus ``non_lora_state_dict.pth`` (the trained rest: head,
embeddings, vision tower). Keys use transformers 4.45's Qwen2-VL naming, optionally under peft's
``base_model.model.``. ``.pth`` files are read with ``torch.load(weights_only=True)`` only and must hold tensors;
LoRA is merged through peft into the base model's weights. Every file is read and checked before the model is built,
and conversion writes atomically: a bad checkpoint leaves nothing behind.

The prompt the model was trained with is VideoAlign's text, which this zoo does not ship: conversion reads it from the
user's VideoAlign checkout by parsing its prompt module with ``ast`` (the module is never imported or run), checks its
SHA-256 and writes it into the converted ``config.json``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reward_zoo.base import load_state_strict
from reward_zoo.videoreward import (
    BASE_MODEL,
    MAX_FRAME_PIXELS,
    PAPER,
    PROMPT_MODULE,
    PROMPT_NAME,
    PROMPT_SHA256,
    REPO,
    REPO_REVISION,
    WEIGHTS_REPO,
    VideoReward,
    check_prompt_template,
    check_reward_stats,
    smart_resize,
)


def string_value(node: ast.expr, where: str) -> str:
    """The value of a string expression made of literals and ``+`` only (what a constant's definition may be); any
    name, call or f-string is refused rather than evaluated."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return string_value(node.left, where) + string_value(node.right, where)
    raise ValueError(f"{where} is not a plain string literal (found {type(node).__name__} at line "
                     f"{getattr(node, 'lineno', '?')}); expected VideoAlign's prompt module")


def read_prompt_template(videoalign_repo: str | os.PathLike, accept_sha256: str | None = None) -> str:
    """VideoAlign's ``detailed_special`` prompt from a checkout of its repository: the string assigned to
    ``PROMPT_NAME`` at the top level of ``PROMPT_MODULE``, read by parsing the file (never importing or running it).

    Its SHA-256 must be ``accept_sha256`` (default ``PROMPT_SHA256``, the text at ``REPO_REVISION``), so the converted
    reward holds the prompt the weights were trained with, or one the user accepted by its hash.
    """
    path = Path(videoalign_repo) / PROMPT_MODULE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --videoalign_repo must be a checkout of {REPO} (revision "
                                f"{REPO_REVISION}), which holds {PROMPT_MODULE}")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not a readable Python module ({type(err).__name__}: {err}); expected "
                         f"VideoAlign's {PROMPT_MODULE}") from None
    values = [node.value for node in tree.body
              if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == PROMPT_NAME
                                                      for t in node.targets)
              or isinstance(node, ast.AnnAssign) and node.value is not None
              and isinstance(node.target, ast.Name) and node.target.id == PROMPT_NAME]
    if len(values) != 1:
        raise ValueError(f"{path} assigns {PROMPT_NAME} {len(values)} times at its top level; expected once "
                         f"(VideoAlign's detailed_special template, revision {REPO_REVISION})")
    try:
        template = string_value(values[0], f"{path}: {PROMPT_NAME}")
    except RecursionError:
        raise ValueError(f"{path}: {PROMPT_NAME} nests too deeply to read; expected a string literal") from None
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()
    expected = (accept_sha256 or PROMPT_SHA256).lower()
    if digest != expected:
        hint = (f"the hash of VideoAlign at revision {REPO_REVISION}, which the weights were trained with; check "
                f"out that revision, or pass --prompt_sha256 {digest} to accept this text"
                if accept_sha256 is None else "the hash --prompt_sha256 accepts")
        raise ValueError(f"{path}: {PROMPT_NAME} has SHA-256 {digest}, expected {expected} ({hint})")
    return check_prompt_template(template, f"{path}: {PROMPT_NAME}")


def read_pth(path: Path) -> dict[str, Tensor]:
    """A ``.pth`` state dict read with ``torch.load(weights_only=True)``: tensors only, never other objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a weights-only state dict ({first[:160]}); expected a dict of tensor "
                         "names to tensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        kind = type(state).__name__ if not isinstance(state, dict) else "a dict with non-tensor values"
        raise ValueError(f"{path} holds {kind}; expected a dict of tensor names to tensors")
    return state


_LEGACY = re.compile(r"^(base_model\.model\.)?")


def reward_key(key: str) -> str | None:
    """Our state-dict key for a VideoAlign (transformers 4.45 naming, peft-wrapped or not) key; None for the unused
    LM head."""
    key = _LEGACY.sub("", key)
    if key.startswith("lm_head."):
        return None
    if key.startswith("rm_head."):
        return key
    if key.startswith(("model.visual.", "model.language_model.")):
        return key
    if key.startswith("visual."):
        return f"model.{key}"
    if key.startswith("model."):
        return f"model.language_model.{key[len('model.'):]}"
    return key  # unknown: the strict load names it


def find_checkpoint(folder: Path, step: int | None) -> Path:
    """``folder/checkpoint-N`` (the highest N, or ``step``), or a one-line error naming what was expected."""
    found = {int(p.name.split("-", 1)[1]): p for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-", 1)[1].isdigit()}
    if not found:
        raise FileNotFoundError(f"{folder} holds no checkpoint-N folder; expected VideoAlign's layout: "
                                "model_config.json and checkpoint-N/ with model.pth, or adapter_model.safetensors + "
                                "non_lora_state_dict.pth")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"{folder} has no checkpoint-{step}; it has {sorted(found)}")
    return found[step]


def read_model_config(folder: Path) -> dict[str, Any]:
    """VideoAlign's ``model_config.json``, checked to describe what this port reproduces."""
    path = folder / "model_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a VideoAlign checkpoint folder holds model_config.json and "
                                "checkpoint-N/")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in ("data_config", "model_config")):
        raise ValueError(f"{path} must hold the objects data_config and model_config (VideoAlign's layout)")
    data, model = meta["data_config"], meta["model_config"]
    expected = {("data_config", "prompt_template_type"): "detailed_special", ("data_config", "sample_type"): "uniform",
                ("model_config", "reward_token"): "special", ("model_config", "use_special_tokens"): True}
    for (section, key), value in expected.items():
        if meta[section].get(key, value) != value:
            raise ValueError(f"{path}: {section}.{key} is {meta[section][key]!r}; this port reproduces {value!r} only")
    if data.get("num_frames") is not None:
        raise ValueError(f"{path}: data_config.num_frames is {data['num_frames']!r}; this port samples by fps only")
    if model.get("output_dim", 1) not in (1, 3):
        raise ValueError(f"{path}: model_config.output_dim must be 1 or 3, got {model['output_dim']!r}")
    return meta


def base_state_dict(base: str) -> dict[str, Tensor]:
    """The base model's weights (every ``*.safetensors`` of a folder or Hub repository) in our naming."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file

    folder = Path(base) if os.path.isdir(base) else Path(snapshot_download(base, allow_patterns=["*.safetensors"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in the base model {base} ({folder})")
    state = {}
    for file in files:
        state.update(load_file(file))
    return {ours: v for k, v in state.items() if (ours := reward_key(k)) is not None}


def load_strict(reward: VideoReward, state: dict[str, Tensor], source: Path | str) -> None:
    """Load ``state`` (our naming) into ``reward``: every key present, none extra, every shape equal, else a one-line
    error naming ``source`` and the first offending key."""
    load_state_strict(reward, state, f"{source} does not fit the model config")


def map_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {ours: v for k, v in state.items() if (ours := reward_key(k)) is not None}


def merge_lora(reward: VideoReward, adapter: dict[str, Tensor], peft_config: dict, source: Path) -> None:
    """Apply VideoAlign's LoRA (``adapter_model.safetensors``) to ``reward.model`` through peft and merge it."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ours = {}
    for key, value in adapter.items():
        mapped = reward_key(key)
        if mapped is None or not mapped.startswith("model.") or ".lora_" not in mapped:
            raise ValueError(f"{source}: unexpected adapter key {key!r}; expected LoRA weights of the language model")
        ours["base_model.model." + mapped[len("model."):]] = value
    targets = sorted({k[len("base_model.model."):].split(".lora_")[0] for k in ours})
    modules = dict(reward.model.named_modules())
    bad = [t for t in targets if not isinstance(modules.get(t), nn.Linear)]
    if bad:
        raise ValueError(f"{source} adapts {bad[0]!r}, which is not a linear layer of the model config")
    rank = {v.shape[0] for k, v in ours.items() if ".lora_A." in k}
    r = int(peft_config.get("lora_r", 16))
    if rank != {r}:
        raise ValueError(f"{source} holds LoRA ranks {sorted(rank)}, model_config.json says lora_r={r}")
    config = LoraConfig(r=r, lora_alpha=peft_config.get("lora_alpha", 32), target_modules=targets, lora_dropout=0.0,
                        use_rslora=bool(peft_config.get("use_rslora", False)), bias="none")
    wrapped = get_peft_model(reward.model, config)
    result = set_peft_model_state_dict(wrapped, ours)
    lora_missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or lora_missing:
        first = result.unexpected_keys[:1] or lora_missing[:1]
        raise ValueError(f"{source} does not fit the model config: LoRA key {first[0]!r} unmatched")
    reward.model = wrapped.merge_and_unload()


def load_videoalign(folder: str | os.PathLike, base_model: str | None = None, checkpoint_step: int | None = None,
                    normalize: bool = True, processor_name_or_path: str | None = None,
                    prompt_template: str | None = None) -> VideoReward:
    """Load VideoAlign's published folder: ``model_config.json`` and ``checkpoint-N/`` (the highest N unless
    ``checkpoint_step``) holding ``model.pth``, or ``adapter_model.safetensors`` + ``non_lora_state_dict.pth`` (LoRA,
    merged through peft into the base model's weights). Reads and checks every file before building the model.

    Args:
        base_model: the base Qwen2-VL (Hub id or folder) for its config and, for LoRA, its weights; default
            ``model_config.model_name_or_path`` of the checkpoint.
        normalize: standardise scores with the checkpoint's ``inference_config`` (then required).
        processor_name_or_path: the processor (tokenizer, chat template); default the base model.
        prompt_template: VideoAlign's prompt (:func:`read_prompt_template`); without it the reward loads but cannot
            score.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"VideoAlign checkpoint folder not found: {folder}")
    meta = read_model_config(folder)
    checkpoint = find_checkpoint(folder, checkpoint_step)
    stats = meta.get("inference_config")
    if normalize:
        if stats is None:
            raise ValueError(f"{folder / 'model_config.json'} has no inference_config (the means and stds of the "
                             "scores), which normalisation needs; pass normalize=False for raw scores")
        check_reward_stats(stats, f"{folder / 'model_config.json'} inference_config")
    full, lora = checkpoint / "model.pth", checkpoint / "adapter_model.safetensors"
    non_lora = checkpoint / "non_lora_state_dict.pth"
    if full.is_file():
        state, adapter, source = map_keys(read_pth(full)), None, full
    elif lora.is_file() and non_lora.is_file():
        from safetensors.torch import load_file

        state, adapter, source = map_keys(read_pth(non_lora)), load_file(lora), non_lora
    else:
        raise FileNotFoundError(f"{checkpoint} holds neither model.pth nor adapter_model.safetensors + "
                                "non_lora_state_dict.pth")
    base = base_model or meta["model_config"].get("model_name_or_path") or BASE_MODEL
    model_config = AutoConfig.from_pretrained(base).to_dict()
    embed = state.get("model.language_model.embed_tokens.weight")
    if adapter is not None:  # the base model's weights under the trained ones
        base_state = base_state_dict(base)
        vocab = embed.shape[0] if embed is not None else None
        for key in [k for k in base_state if k.endswith("embed_tokens.weight")]:
            if vocab is not None:  # VideoAlign resized the vocabulary to its tokenizer; the trained rows replace it
                base_state[key] = base_state[key][:vocab]
        state = {**base_state, **state}
        embed = state.get("model.language_model.embed_tokens.weight")
    if embed is not None:
        model_config["text_config"]["vocab_size"] = embed.shape[0]
    data = meta["data_config"]
    reward = VideoReward(model_config=model_config, processor_name_or_path=processor_name_or_path or base,
                 output_dim=meta["model_config"].get("output_dim", 1), fps=float(data.get("fps") or 2.0),
                 max_pixels=int(data.get("max_frame_pixels") or MAX_FRAME_PIXELS), normalize=normalize,
                 reward_stats=stats if normalize else None, prompt_template=prompt_template)
    load_strict(reward, state, source)
    if adapter is not None:
        merge_lora(reward, adapter, meta.get("peft_lora_config") or {}, lora)
    return reward.eval()


def card_text(reward: VideoReward, source: str) -> str:
    """The markdown body of a converted VideoReward checkpoint's model card."""
    h, w = smart_resize(480, 832, reward.min_pixels, reward.max_pixels)
    return "\n".join([
        "# videoreward", "",
        f"VideoAlign's VideoReward (Liu et al., [arXiv 2501.13918]({PAPER})) as a `reward_zoo` reward: Qwen2-VL-2B "
        "fine-tuned on human preferences between generated videos, read at three reward tokens of its prompt.", "",
        "```python", "from reward_zoo import create_reward", "",
        'reward = create_reward("hf-hub:ORG/REPO")  # or this folder',
        "scores = reward(videos, prompts, fps=16)  # videos: [B, T, C, H, W] float in [0, 1]; fps: their frame rate",
        "```", "",
        "## Source", "",
        f"- Converted from `{Path(source).name}` (the authors' weights: https://huggingface.co/{WEIGHTS_REPO}) by "
        "`reward-zoo convert videoreward`.",
        f"- Repository: {REPO} (revision {REPO_REVISION}); paper: {PAPER}.",
        f"- Prompt: VideoAlign's `detailed_special` template, read from a VideoAlign checkout (`--videoalign_repo`) "
        f"into `config.json` (`prompt_template`, SHA-256 "
        f"`{hashlib.sha256(reward.prompt_template.encode()).hexdigest()}`; revision {REPO_REVISION[:8]} gives "
        f"`{PROMPT_SHA256[:12]}...`).", "",
        "## Scores", "",
        "- `visual` (VQ), `motion` (MQ), `text` (TA): unbounded reals"
        + (", standardised with the checkpoint's means and stds (z-scores against VideoAlign's validation set)"
           if reward.normalize else " (raw head outputs)")
        + "; `overall` is their sum. Only differences carry meaning.",
        "- Differentiable: yes (torch preprocessing, gradients reach the pixels).",
        f"- Input: the videos' frame rate is required (`fps=`); frames are sampled at {reward.fps:g} fps (at least 4, "
        f"an even count) and resized to a {reward.max_pixels}-pixel budget with sides multiples of 28 "
        f"(a 480x832 video becomes {h}x{w}).", "",
        "## Parity", "",
        "On tiny random Qwen2-VL configs the scores of the torch path equal transformers' `Qwen2VLProcessor` on the "
        "same frames as PIL images followed by the model and head within 1e-4 (float32), and the LoRA merge equals "
        "the hand-merged weights: `python -m pytest tests/test_reward_videoreward.py`. Not verified against the real "
        "weights (no download here).", "",
        "## Licence", "",
        "mit: the VideoAlign repository's licence (Kling Team, Kuaishou Technology). The weights build on "
        "Qwen2-VL-2B-Instruct (apache-2.0); check the authors' terms before redistributing them.", ""])


def convert_videoreward(source: str | os.PathLike, destination: str | os.PathLike,
                        videoalign_repo: str | os.PathLike, base_model: str | None = None,
                        checkpoint_step: int | None = None, normalize: bool = True,
                        processor_name_or_path: str | None = None, prompt_sha256: str | None = None) -> Path:
    """Convert VideoAlign's published folder into our Hub layout (``config.json``, ``model.safetensors``,
    ``README.md``) at ``destination``, atomically: on any error nothing is written. The prompt template comes from
    the VideoAlign checkout ``videoalign_repo`` (:func:`read_prompt_template`; ``prompt_sha256`` accepts a text other
    than the pinned revision's) and lands in ``config.json``.

    Raises:
        FileExistsError: ``destination`` exists and is not empty.
        FileNotFoundError, ValueError: the source is not a usable VideoAlign checkpoint (naming the file).
    """
    from huggingface_hub import ModelCard

    from lit_videoalign.video_io import atomic_dir

    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} exists and is not empty; choose a new folder for the converted reward")
    template = read_prompt_template(videoalign_repo, prompt_sha256)
    reward = load_videoalign(source, base_model, checkpoint_step, normalize, processor_name_or_path, template)
    with atomic_dir(destination) as tmp:
        reward.save_pretrained(tmp)
        card = reward.generate_model_card()
        ModelCard(f"---\n{card.data.to_yaml()}\n---\n\n{card_text(reward, str(source))}").save(Path(tmp) / "README.md")
    return destination
