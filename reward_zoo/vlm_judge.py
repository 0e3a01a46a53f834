"""Generative VLM judge (VideoScore2, arXiv 2509.22799; UnifiedReward, arXiv 2503.05236), pointwise and pairwise.

A vision-language model (transformers' Qwen2-VL or Qwen2.5-VL, loaded with ``from_pretrained``; no remote code) is
asked about a generated video, and the score is read from its next-token distribution instead of parsing free text:

- ``answer: rating``: the expected value over the rating tokens (``rating_scale``, default "1".."5"), with the softmax
  restricted to those tokens; ``normalize`` maps it to [0, 1];
- ``answer: yes_no``: P("Yes") over {"Yes", "No"};
- pairwise (:meth:`VLMJudge.compare`): both videos in one prompt ("Video A", "Video B"), P("A") over {"A", "B"},
  symmetrised by asking again with the order swapped: ``p = (P_A(a, b) + 1 - P_A(b, a)) / 2``, so
  ``compare(a, b) = 1 - compare(b, a)``.

The question is a template (:mod:`reward_zoo.vlm_judge_templates`): ``videoscore2`` asks one question per dimension
(visual quality, text alignment, physical consistency), ``unifiedreward`` one overall question, or a custom string
with ``{prompt}`` and ``{dimension}``. The wording is this suite's; a fine-tuned judge scores best with the prompt it
was trained on, which a custom template can reproduce.

Frames are sampled by time as ``videoreward`` samples them (``sample_fps`` from the videos' own frame rate, which the
call's ``fps`` gives), resized to the ``max_pixels`` budget and patchified in torch. Scoring is deterministic and
batched (``batch_size`` prompts per forward pass, left-padded). With ``chain_of_thought`` the judge first writes a
rationale (sampled with ``seed`` under a forked RNG, so the caller's random state is untouched), then the score cue
is appended and the score read as above; the rationales of the last call are kept in ``last_rationales``.
Each (video, dimension) question is one sequence, so the vision tower runs once per dimension.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from torch import Tensor

from lit_videoalign.errors import hub_offline_error
from reward_zoo import vlm_judge_templates as templates
from reward_zoo.base import RewardModel
from reward_zoo.pairwise import PairwiseReward
from reward_zoo.registry import register_reward
from reward_zoo.videoreward import patchify, sample_frame_indices, smart_resize

PAPER = "https://arxiv.org/abs/2509.22799"
# config.json model_type -> the transformers class that loads it; nothing else is loaded (no remote code).
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
ANSWERS = ("rating", "yes_no")
YES_NO, A_B = ("Yes", "No"), ("A", "B")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SCALE = ("1", "2", "3", "4", "5")


@register_reward("vlm_judge")
class VLMJudge(RewardModel, PairwiseReward, paper_url=PAPER):
    """A VLM asked about each video; scores from the next-token distribution (see the module docstring).

    Args:
        pretrained_model_name_or_path: a Qwen2-VL or Qwen2.5-VL checkpoint (Hub id or folder, safetensors); its
            ``config.json`` ``model_type`` picks the transformers class.
        model_revision: Hub revision of the checkpoint (and of the processor when it comes from the same repo).
        processor_name_or_path: the processor (tokenizer, chat template); default the checkpoint's.
        template: ``videoscore2``, ``unifiedreward``, or a question with ``{prompt}`` and ``{dimension}``.
        pair_template: the pairwise question (``{prompt}``, ``{dimension}``); default the template style's.
        dimensions: ``{name: description}`` (or a list of names) asked one question each, overriding the template's
            defaults; a single ``overall`` entry gives one score and no named dimension.
        answer: ``rating`` (expected rating) or ``yes_no`` (P(Yes)).
        rating_scale: the rating tokens, each one token of the tokenizer and a number (default "1".."5").
        normalize: map an expected rating to [0, 1] (``(E - low) / (high - low)``).
        sample_fps: frames per second sampled from the videos (their own rate is the call's ``fps``).
        max_pixels, min_pixels: the per-frame pixel budget of the resize (sides multiples of 28).
        batch_size: sequences per forward pass.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's); None: transformers' default.
        chain_of_thought: write a rationale first, then read the score.
        max_new_tokens, temperature, seed: the rationale's length cap, sampling temperature (0: greedy) and seed.
    """

    differentiable = False
    requires_prompts = True
    min_frames = 2  # one temporal patch of the vision tower
    license = None  # depends on the checkpoint

    def __init__(self, pretrained_model_name_or_path: str, model_revision: str | None = None,
                 processor_name_or_path: str | None = None, template: str = "videoscore2",
                 pair_template: str | None = None, dimensions: dict[str, str] | list[str] | None = None,
                 answer: str = "rating", rating_scale: list[str] | None = None, normalize: bool = True,
                 sample_fps: float = 2.0, max_pixels: int = 448 * 448, min_pixels: int = 4 * 28 * 28,
                 batch_size: int = 4, dtype: str | None = None, chain_of_thought: bool = False,
                 max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        import transformers

        if answer not in ANSWERS:
            raise ValueError(f"vlm_judge: answer must be one of {ANSWERS}, got {answer!r}")
        self.rating_scale = list(DEFAULT_SCALE if rating_scale is None else rating_scale)
        self.rating_values = check_rating_scale(self.rating_scale)
        for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("max_pixels", max_pixels),
                            ("min_pixels", min_pixels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"vlm_judge: {name} must be a positive integer, got {value!r}")
        if isinstance(sample_fps, bool) or not isinstance(sample_fps, (int, float)) or not sample_fps > 0:
            raise ValueError(f"vlm_judge: sample_fps must be a positive number, got {sample_fps!r}")
        if not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"vlm_judge: temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"vlm_judge: seed must be an integer, got {seed!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"vlm_judge: dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")
        self.point_template, self.pair_template, self.questions = resolve_template(template, pair_template,
                                                                                   dimensions)
        self.answer, self.normalize, self.sample_fps = answer, bool(normalize), float(sample_fps)
        self.max_pixels, self.min_pixels, self.batch_size = max_pixels, min_pixels, batch_size
        self.chain_of_thought, self.max_new_tokens = bool(chain_of_thought), max_new_tokens
        self.temperature, self.seed = float(temperature), seed
        self.last_rationales: list[str] = []

        self.model_type = checkpoint_model_type(pretrained_model_name_or_path, model_revision)
        model_class = getattr(transformers, MODEL_CLASSES[self.model_type])
        load = {"revision": model_revision, "use_safetensors": True}
        if dtype is not None:
            load["dtype"] = DTYPES[dtype]
        self.model = model_class.from_pretrained(pretrained_model_name_or_path, **load).eval()
        self.model.requires_grad_(False)  # a judge: never trained through this reward
        same_repo = processor_name_or_path is None
        self.processor = transformers.AutoProcessor.from_pretrained(
            pretrained_model_name_or_path if same_repo else processor_name_or_path,
            revision=model_revision if same_repo else None)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the next-token logits of every sequence sit at the last position
        self.video_token = self.processor.video_token
        self.video_token_id = self.model.config.video_token_id
        if self.tokenizer.convert_tokens_to_ids(self.video_token) != self.video_token_id:
            raise ValueError(f"vlm_judge: the processor maps {self.video_token} to "
                             f"{self.tokenizer.convert_tokens_to_ids(self.video_token)} but the model expects "
                             f"video_token_id {self.video_token_id}; use the checkpoint's own processor")
        scored = self.rating_scale if answer == "rating" else list(YES_NO)
        self.score_ids = [single_token_id(self.tokenizer, tok, "answer token") for tok in scored]
        self.pair_ids = [single_token_id(self.tokenizer, tok, "pairwise answer token") for tok in A_B]
        image_processor = getattr(self.processor, "video_processor", None) or self.processor.image_processor
        self.register_buffer("pixel_mean", torch.tensor(image_processor.image_mean).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(image_processor.image_std).view(1, -1, 1, 1),
                             persistent=False)

    # -- card facts that depend on the config ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[str, ...]:
        names = tuple(self.questions)
        return () if names == ("overall",) else names

    @property
    def pairwise_dimensions(self) -> tuple[str, ...]:
        return self.dimensions

    @property
    def score_ranges(self) -> dict[str, tuple[float, float]]:
        low, high = (0.0, 1.0) if self.normalize or self.answer == "yes_no" else (min(self.rating_values),
                                                                                 max(self.rating_values))
        return {dim: (low, high) for dim in (*self.dimensions, "overall")}

    @property
    def expected_fps(self) -> float:
        return self.sample_fps

    # -- inputs ---------------------------------------------------------------------------------------------------
    def encode_videos(self, videos: Tensor, fps: float) -> list[tuple[Tensor, list[int], float]]:
        """Videos ``(b, t, c, h, w)`` in [0, 1] -> per video ``(patches (n, d), grid [t', h', w'], seconds per
        temporal patch)``: frames sampled at ``sample_fps``, resized to the pixel budget, normalised, patchified."""
        b, t, c, h, w = videos.shape
        vision = self.model.config.vision_config
        idx = sample_frame_indices(t, fps, self.sample_fps)
        frames = videos[:, idx].flatten(0, 1).float()  # (b * k, c, h, w)
        size = smart_resize(h, w, self.min_pixels, self.max_pixels, vision.patch_size * vision.spatial_merge_size)
        if size != (h, w):
            frames = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        frames = ((frames - self.pixel_mean.to(frames)) / self.pixel_std.to(frames)).view(b, len(idx), c, *size)
        grid = [len(idx) // vision.temporal_patch_size, size[0] // vision.patch_size, size[1] // vision.patch_size]
        seconds = vision.temporal_patch_size * t / (len(idx) * fps)  # sampled rate = k / (t / fps)
        return [(patchify(v, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size), grid, seconds)
                for v in frames]

    def point_messages(self, prompt: str, description: str) -> list[dict[str, Any]]:
        """The chat of one pointwise question: the video, then the question and the answer instruction."""
        text = templates.fill(self.point_template, prompt, description)
        text += "\n" + templates.answer_instruction(self.answer, self.rating_scale, self.chain_of_thought)
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]

    def pair_messages(self, prompt: str, description: str) -> list[dict[str, Any]]:
        """The chat of one pairwise question: "Video A:", the first video, "Video B:", the second, the question."""
        text = templates.fill(self.pair_template, prompt, description)
        text += "\n" + templates.answer_instruction("pair", self.rating_scale, self.chain_of_thought)
        content = [{"type": "text", "text": templates.VIDEO_A}, {"type": "video"},
                   {"type": "text", "text": "\n" + templates.VIDEO_B}, {"type": "video"},
                   {"type": "text", "text": "\n" + text}]
        return [{"role": "user", "content": content}]

    def chat_text(self, messages: list[dict[str, Any]], grids: list[list[int]]) -> str:
        """The chat template's text with the generation prompt, each ``<|video_pad|>`` expanded to its video's
        tokens (what the processor does)."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(self.video_token)
        if len(parts) != len(grids) + 1:
            raise ValueError(f"vlm_judge: the chat template wrote {len(parts) - 1} {self.video_token} for "
                             f"{len(grids)} videos; use a Qwen2-VL chat template")
        merge = self.model.config.vision_config.spatial_merge_size ** 2
        out = parts[0]
        for grid, part in zip(grids, parts[1:]):
            out += self.video_token * (math.prod(grid) // merge) + part
        return out

    def model_inputs(self, texts: list[str], videos: list[tuple[Tensor, list[int], float]]) -> dict[str, Tensor]:
        """Tokenised, left-padded texts and the videos they hold in order of appearance, on the model's device."""
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        device = self.model.device
        ids = tokens["input_ids"].to(device)
        inputs = {"input_ids": ids, "attention_mask": tokens["attention_mask"].to(device),
                  "mm_token_type_ids": (ids == self.video_token_id).int() * 2,  # text 0, video 2
                  "pixel_values_videos": torch.cat([v[0] for v in videos]).to(device, self.model.dtype),
                  "video_grid_thw": torch.tensor([v[1] for v in videos], device=device)}
        if self.model_type == "qwen2_5_vl":  # time-aligned rotary positions need each video's seconds per patch
            inputs["second_per_grid_ts"] = torch.tensor([v[2] for v in videos], device=device)
        return inputs

    # -- asking -----------------------------------------------------------------------------------------------------
    def ask(self, queries: list[tuple[list[dict[str, Any]], list[int]]], videos: list[tuple[Tensor, list[int], float]],
            answer_ids: list[int]) -> tuple[Tensor, list[str]]:
        """Each query ``(messages, indices of its videos)`` -> the probabilities ``(n, k)`` of the ``k`` answer
        tokens (softmax restricted to them) at the answer position, and the rationales (chain of thought only)."""
        probs, rationales = [], []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start:start + self.batch_size]
            clips = [videos[i] for _, idx in chunk for i in idx]
            texts = [self.chat_text(messages, [videos[i][1] for i in idx]) for messages, idx in chunk]
            if self.chain_of_thought:
                reasons = self.reason(self.model_inputs(texts, clips))
                texts = [text + reason + templates.SCORE_CUE for text, reason in zip(texts, reasons)]
                rationales += reasons
            logits = self.model(**self.model_inputs(texts, clips), use_cache=False, logits_to_keep=1).logits
            probs.append(logits[:, -1, answer_ids].float().softmax(-1))  # (n, k)
        return torch.cat(probs), rationales

    def reason(self, inputs: dict[str, Tensor]) -> list[str]:
        """The rationale of each sequence: generated with ``seed`` under a forked RNG (sampled, or greedy at
        temperature 0), decoded without special tokens."""
        device = inputs["input_ids"].device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
            else []
        sample = self.temperature > 0
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                      temperature=self.temperature if sample else None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def read_score(self, probs: Tensor) -> Tensor:
        """Answer-token probabilities ``(n, k)`` -> scores ``(n,)``: the expected rating (normalised to [0, 1] if
        ``normalize``), or P(Yes)."""
        if self.answer == "yes_no":
            return probs[:, 0]
        values = torch.tensor(self.rating_values, dtype=probs.dtype, device=probs.device)
        expected = probs @ values
        if self.normalize:
            low, high = min(self.rating_values), max(self.rating_values)
            expected = (expected - low) / (high - low)
        return expected

    # -- scoring ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        """One question per (video, dimension); ``overall`` is the mean over dimensions. ``last_rationales`` holds
        the rationales video-major, then dimension (empty without chain of thought)."""
        fps = self.require_fps(fps, expected=self.sample_fps)
        clips = self.encode_videos(videos, fps)
        descriptions = list(self.questions.values())
        queries = [(self.point_messages(prompt, desc), [i]) for i, prompt in enumerate(prompts)
                   for desc in descriptions]
        probs, self.last_rationales = self.ask(queries, clips, self.score_ids)
        scores = self.read_score(probs).view(len(prompts), len(descriptions))  # (b, d)
        out = {dim: scores[:, j] for j, dim in enumerate(self.dimensions)}
        out["overall"] = scores.mean(1)
        return out

    @torch.no_grad()
    def forward_pair(self, videos_a: Tensor, videos_b: Tensor, prompts: list[str] | None,
                     fps: float | None) -> dict[str, Tensor]:
        """P(a beats b) per dimension, symmetrised over both orders; ``last_rationales`` holds the (a, b) order's
        rationales (pair-major, then dimension), then the swapped order's."""
        fps = self.require_fps(fps, expected=self.sample_fps)
        b = videos_a.shape[0]
        clips = self.encode_videos(videos_a, fps) + self.encode_videos(videos_b, fps)  # a_i at i, b_i at b + i
        descriptions = list(self.questions.values())
        queries = [(self.pair_messages(prompts[i], desc), [first + i, second + i])
                   for first, second in ((0, b), (b, 0)) for i in range(b) for desc in descriptions]
        probs, self.last_rationales = self.ask(queries, clips, self.pair_ids)
        p_first = probs[:, 0].view(2, b, len(descriptions))  # P("A") with (a, b), then with (b, a)
        p = (p_first[0] + 1 - p_first[1]) / 2  # (b, d)
        out = {dim: p[:, j] for j, dim in enumerate(self.dimensions)}
        out["overall"] = p.mean(1)
        return out


# -- checks -----------------------------------------------------------------------------------------------------------
def checkpoint_model_type(path_or_repo_id: str, revision: str | None = None) -> str:
    """The checkpoint's ``config.json`` ``model_type``, or a one-line error unless it is Qwen2-VL or Qwen2.5-VL."""
    if os.path.isdir(path_or_repo_id):
        config_file = os.path.join(path_or_repo_id, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"vlm_judge: no config.json in {path_or_repo_id}; expected a transformers "
                                    f"Qwen2-VL or Qwen2.5-VL checkpoint folder")
    else:
        try:
            config_file = hf_hub_download(path_or_repo_id, "config.json", revision=revision)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
            raise hub_offline_error(path_or_repo_id, "judge model") from err
    try:
        model_type = json.loads(Path(config_file).read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"vlm_judge: {config_file} is not a JSON object ({err})") from None
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"vlm_judge supports model_type {sorted(MODEL_CLASSES)} (Qwen2-VL, Qwen2.5-VL), but "
                         f"{path_or_repo_id} has model_type {model_type!r}")
    return model_type


def check_rating_scale(scale: Any) -> list[float]:
    """The numeric values of ``scale`` (at least two distinct number strings), or a one-line error."""
    if not isinstance(scale, list) or len(scale) < 2 or not all(isinstance(tok, str) for tok in scale):
        raise ValueError(f"vlm_judge: rating_scale must be a list of at least two strings, got {scale!r}")
    try:
        values = [float(tok) for tok in scale]
    except ValueError:
        raise ValueError(f"vlm_judge: every rating token must be a number (its value is the rating), got "
                         f"{scale!r}") from None
    if len(set(values)) != len(values):
        raise ValueError(f"vlm_judge: rating_scale values must be distinct, got {scale!r}")
    return values


def single_token_id(tokenizer: Any, token: str, what: str) -> int:
    """The id of ``token`` if the tokenizer encodes it as exactly one token, else a one-line error."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"vlm_judge: {what} {token!r} is {len(ids)} tokens {ids} for this tokenizer; scores are read "
                         f"from one token's probability, so choose answer tokens the tokenizer keeps whole")
    return ids[0]


def resolve_template(template: Any, pair_template: Any, dimensions: Any) -> tuple[str, str, dict[str, str]]:
    """``(point question, pair question, {dimension: description})`` from the init arguments, or a one-line error."""
    if template in templates.STYLES:
        point, pair, questions = templates.STYLES[template]
    elif isinstance(template, str) and templates.PROMPT_FIELD in template:
        point, pair, questions = template, templates.GENERIC_PAIR, {"overall": "overall quality"}
    else:
        shown = template[:80] if isinstance(template, str) else type(template).__name__
        raise ValueError(f"vlm_judge: template must be one of {sorted(templates.STYLES)} or a question holding "
                         f"{templates.PROMPT_FIELD} (and {templates.DIMENSION_FIELD}), got {shown!r}")
    if pair_template is not None:
        if not isinstance(pair_template, str) or templates.PROMPT_FIELD not in pair_template:
            raise ValueError(f"vlm_judge: pair_template must be a string holding {templates.PROMPT_FIELD}, got "
                             f"{pair_template!r}")
        pair = pair_template
    if dimensions is not None:
        if isinstance(dimensions, list) and all(isinstance(d, str) for d in dimensions):
            dimensions = {d: d.replace("_", " ") for d in dimensions}
        if not isinstance(dimensions, dict) or not dimensions or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in dimensions.items()):
            raise ValueError(f"vlm_judge: dimensions must be a non-empty {{name: description}} dict or list of names, "
                             f"got {dimensions!r}")
        questions = dict(dimensions)
    if "overall" in questions and len(questions) > 1:
        raise ValueError(f"vlm_judge: 'overall' is the mean of the dimensions and cannot be one of several, got "
                         f"{sorted(questions)}")
    for name, text in (("template", point), ("pair_template", pair)):
        if len(questions) > 1 and templates.DIMENSION_FIELD not in text:
            raise ValueError(f"vlm_judge: {name} must hold {templates.DIMENSION_FIELD} to ask about "
                             f"{len(questions)} dimensions {sorted(questions)}")
    return point, pair, questions
