"""videoreward (VideoAlign's VideoReward): preprocessing as trained, parity with transformers' Qwen2VLProcessor path,
VideoAlign checkpoint folders (full and LoRA), the prompt template read from a VideoAlign checkout (a stand-in written
here: VideoAlign's text is not shipped), conversion to the Hub layout, bad input, and training runs."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import test_hub
import torch
from PIL import Image

from lit_videoalign.testing import (
    TINY_REWARD_STATS,
    TINY_VIDEOREWARD_TEMPLATE,
    tiny_qwen2vl_config,
    write_tiny_qwen2vl_processor,
    write_tiny_videoreward,
)
from reward_zoo import create_reward, reward_info
from reward_zoo.videoalign_checkpoint import convert_videoreward, load_videoalign, read_prompt_template
from reward_zoo.videoreward import (
    PROMPT_NAME,
    PROMPT_SHA256,
    REPO_REVISION,
    SPECIAL_TOKENS,
    VideoReward,
    build_prompt,
    sample_frame_indices,
    smart_resize,
)

hub = test_hub.hub  # the local loopback Hub of tests/hub_server.py
PROMPTS = ["a red ball falls", "a blue ball {moves} left"]  # braces: the prompt is substituted, never formatted
TEMPLATE_SHA256 = hashlib.sha256(TINY_VIDEOREWARD_TEMPLATE.encode()).hexdigest()


def write_checkout(root: Path, assignment: str | None = None) -> Path:
    """A stand-in VideoAlign checkout: ``prompt_template.py`` shaped like VideoAlign's (string constants, a dict, a
    ``build_prompt`` function; its text written here), which raises and writes a file if anything runs it."""
    if assignment is None:
        assignment = f'{PROMPT_NAME} = """{TINY_VIDEOREWARD_TEMPLATE}"""'
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompt_template.py").write_text("\n".join([
        "import pathlib",
        "pathlib.Path(__file__).with_name('EXECUTED').write_text('the module ran')",
        "raise RuntimeError('this module must be parsed, never run')",
        "SHORT_PROMPT = 'Score {dimension_name} for: {text_prompt}'",
        "DIMENSIONS = {'VQ': ('looks', 'how the frames look')}",
        assignment,
        "",
        "def build_prompt(prompt, dimension, template_type):",
        f"    return {PROMPT_NAME}.format(text_prompt=prompt)",
        ""]))
    return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> dict[str, str]:
    """The converter arguments naming a stand-in checkout and accepting its template's hash."""
    repo = write_checkout(tmp_path_factory.mktemp("videoalign-checkout"))
    return {"videoalign_repo": str(repo), "prompt_sha256": TEMPLATE_SHA256}


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> str:
    return str(write_tiny_qwen2vl_processor(tmp_path_factory.mktemp("qwen2vl") / "processor"))


def tiny(processor: str, seed: int = 0, **kwargs) -> VideoReward:
    torch.manual_seed(seed)
    kwargs = {"max_pixels": 56 * 56, "min_pixels": 28 * 28, "reward_stats": TINY_REWARD_STATS,
              "prompt_template": TINY_VIDEOREWARD_TEMPLATE, **kwargs}
    return VideoReward(model_config=tiny_qwen2vl_config(), processor_name_or_path=processor, **kwargs).eval()


def quantised_video(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Videos whose pixels are exact 8-bit values, as decoded frames are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, 3, h, w), generator=g).float() / 255


# -- preprocessing ----------------------------------------------------------------------------------------------
def test_prompt_fills_the_template_as_videoalign_does():
    text = build_prompt("Prompt: {text_prompt}; {{literal}} <|VQ_reward|>", "a {cat}")
    assert text == "Prompt: a {cat}; {literal} <|VQ_reward|>"  # str.format: braces of the prompt stay as they are
    assert len(PROMPT_SHA256) == 64 and int(PROMPT_SHA256, 16)  # the pinned text's hash, not the text


@pytest.mark.parametrize("template, message", [
    (TINY_VIDEOREWARD_TEMPLATE.replace("<|MQ_reward|>", ""), r"it has <\|MQ_reward\|> 0 times"),
    (TINY_VIDEOREWARD_TEMPLATE.replace("{text_prompt}", "the request"), r"it has \{text_prompt\} 0 times"),
    (TINY_VIDEOREWARD_TEMPLATE + "<|TA_reward|>", r"it has <\|TA_reward\|> 2 times"),
    (TINY_VIDEOREWARD_TEMPLATE + "{dim}", r"format with \{text_prompt\} as its only field.*KeyError: 'dim'"),
])
def test_a_template_missing_a_token_is_refused(processor, template, message):
    with pytest.raises(ValueError, match=f"prompt_template must .*{message}") as err:
        tiny(processor, prompt_template=template)
    assert "\n" not in str(err.value)


def test_scoring_without_a_template_names_the_conversion(processor):
    reward = tiny(processor, prompt_template=None)
    assert reward.config["prompt_template"] is None
    with pytest.raises(ValueError, match=r"videoreward needs VideoAlign's prompt template; convert the checkpoint with "
                                         r"`reward-zoo convert videoreward SRC DST --videoalign_repo "):
        reward(torch.rand(1, 8, 3, 56, 56), PROMPTS[:1], fps=8.0)


@pytest.mark.parametrize("frames, video_fps, expected", [
    (32, 16.0, [0, 10, 21, 31]),  # 2 s at 16 fps: 4 frames
    (81, 16.0, [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]),  # 10.125 -> 10 (even)
    (16, 8.0, [0, 5, 10, 15]),  # the toy world: 2 s at 8 fps
    (3, 30.0, [0, 2]),  # clamped up to 4, then down to the even count the video has
    (11, 1.0, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]),  # 22 -> at most 10 (11 rounded down to even)
])
def test_frames_are_sampled_as_qwen_vl_utils_does(frames, video_fps, expected):
    assert sample_frame_indices(frames, video_fps, fps=2.0) == expected


def test_long_videos_cap_at_768_frames_and_one_frame_is_too_short():
    assert len(sample_frame_indices(2000, 1.0, fps=2.0)) == 768
    with pytest.raises(ValueError, match="at least 2 frames .*one Qwen2-VL temporal patch.* got a video of 1 frame"):
        sample_frame_indices(1, 16.0)


@pytest.mark.parametrize("size, expected", [((480, 832), (336, 588)), ((32, 32), (336, 336)), ((448, 448), (448, 448)),
                                            ((720, 1280), (336, 588))])
def test_frames_resize_to_the_448x448_budget_with_factor_28(size, expected):
    assert smart_resize(*size) == expected  # hand-computed from qwen-vl-utils' rule (min 128*28*28 pixels)


def test_registered_with_its_card_facts():
    info = reward_info("videoreward")
    assert info["family"] == "videoreward" and info["license"] == "mit" and info["differentiable"]
    assert info["dimensions"] == ["visual", "motion", "text"] and info["requires_prompts"]
    assert info["paper_url"] == "https://arxiv.org/abs/2501.13918"


# -- parity with the processor path -----------------------------------------------------------------------------
def reference_scores(reward: VideoReward, processor: str, videos: torch.Tensor, prompts: list[str],
                     fps: float) -> dict[str, torch.Tensor]:
    """VideoAlign's path: the sampled frames as PIL images through transformers' Qwen2VLProcessor, the model, the
    head at the reward tokens (mask-select, view, diagonal), then inference.py's normalisation."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(processor)
    proc.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    proc.tokenizer.padding_side = "right"
    idx = sample_frame_indices(videos.shape[1], fps, 2.0)
    clips = [[Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in v[idx]] for v in videos]
    texts = [build_prompt(reward.prompt_template, p) for p in prompts]
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]}] for t in texts]
    batch = proc(text=[proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats],
                 videos=clips, padding=True, return_tensors="pt",
                 videos_kwargs={"do_rescale": True, "cap_pixels_per_frame": False,
                                "size": {"shortest_edge": reward.min_pixels, "longest_edge": reward.max_pixels}})
    hidden = reward.model(**batch, use_cache=False).last_hidden_state
    logits = reward.rm_head(hidden)  # (b, l, o)
    special = torch.isin(batch["input_ids"], torch.tensor(reward.special_ids))
    pooled = logits[special].view(len(prompts), 3, -1)
    pooled = pooled.diagonal(dim1=1, dim2=2) if pooled.shape[-1] == 3 else pooled.view(len(prompts), -1)
    mean = torch.tensor([TINY_REWARD_STATS[f"{k}_mean"] for k in ("VQ", "MQ", "TA")])
    std = torch.tensor([TINY_REWARD_STATS[f"{k}_std"] for k in ("VQ", "MQ", "TA")])
    scores = (pooled - mean) / std
    return {"visual": scores[:, 0], "motion": scores[:, 1], "text": scores[:, 2], "overall": scores.sum(1)}


@pytest.mark.parametrize("output_dim", [1, 3])
def test_scores_equal_the_processor_path(processor, output_dim):
    reward = tiny(processor, output_dim=output_dim)
    torch.nn.init.normal_(reward.rm_head.weight)
    videos = quantised_video(2, 16, 56, 56)  # already on the 28-multiple grid: no resize on either path
    with torch.no_grad():
        ours = reward(videos, PROMPTS, fps=8.0)
        ref = reference_scores(reward, processor, videos, PROMPTS, fps=8.0)
        pixels, grid = reward.pixel_values(videos, 8.0)
    for key in ("visual", "motion", "text", "overall"):
        torch.testing.assert_close(ours[key], ref[key], atol=1e-4, rtol=0)  # measured: max 5e-7 (float32)
    assert grid == [2, 4, 4]  # 4 frames -> 2 temporal patches of 4x4 patches (16 vision tokens per video)
    assert not torch.allclose(ours["visual"], ours["motion"])


def test_resized_frames_match_the_processor_up_to_8_bit_rounding(processor):
    """The processor resizes 8-bit frames and rounds; the torch path keeps floats (so it stays differentiable)."""
    reward = tiny(processor)
    torch.nn.init.normal_(reward.rm_head.weight)
    videos = quantised_video(2, 16, 40, 60, seed=1)  # -> 28 x 56 frames
    with torch.no_grad():
        ours = reward(videos, PROMPTS, fps=8.0)
        ref = reference_scores(reward, processor, videos, PROMPTS, fps=8.0)
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], atol=5e-3, rtol=0)  # measured: max 2.1e-4 (8-bit rounding)


def test_gradients_reach_the_pixels_of_the_sampled_frames(processor):
    reward = tiny(processor)
    videos = torch.rand(1, 16, 3, 40, 60, requires_grad=True)
    reward(videos, PROMPTS[:1], fps=8.0)["overall"].sum().backward()
    grad = videos.grad.abs().sum((0, 2, 3, 4))  # (t,)
    assert torch.isfinite(videos.grad).all()
    assert (grad[[0, 5, 10, 15]] > 0).all() and grad[[1, 2, 3, 4]].sum() == 0  # only the 4 sampled frames


def test_scores_follow_the_video_and_normalisation_is_the_inference_config(processor):
    reward, raw = tiny(processor), tiny(processor, normalize=False, reward_stats=None)
    videos = quantised_video(2, 16, 56, 56)
    with torch.no_grad():
        normed, plain = reward(videos, PROMPTS, fps=8.0), raw(videos, PROMPTS, fps=8.0)
        other = raw(videos.flip(1), PROMPTS, fps=8.0)
    for i, key in enumerate(("VQ", "MQ", "TA")):
        dim = ("visual", "motion", "text")[i]
        expected = (plain[dim] - TINY_REWARD_STATS[f"{key}_mean"]) / TINY_REWARD_STATS[f"{key}_std"]
        torch.testing.assert_close(normed[dim], expected)
    assert not torch.allclose(plain["overall"], other["overall"])  # frame order matters (motion)


def test_fps_is_required_and_a_one_frame_video_is_refused(processor):
    reward = tiny(processor)
    with pytest.raises(ValueError, match="VideoReward samples frames by time .*checkpoint samples frames at 2 fps"):
        reward(torch.rand(1, 8, 3, 56, 56), PROMPTS[:1])
    with pytest.raises(ValueError, match="VideoReward needs at least 2 frames"):
        reward(torch.rand(1, 1, 3, 56, 56), PROMPTS[:1], fps=8.0)
    with pytest.raises(ValueError, match="needs prompts"):
        reward(torch.rand(1, 8, 3, 56, 56), fps=8.0)
    with pytest.raises(ValueError, match="must not contain the reward tokens"):
        reward(torch.rand(1, 8, 3, 56, 56), ["<|TA_reward|>"], fps=8.0)
    with pytest.raises(ValueError, match="normalisation needs .*VQ_mean.*pass normalize=False"):
        VideoReward(model_config=tiny_qwen2vl_config(), processor_name_or_path=processor)


# -- VideoAlign checkpoint folders ------------------------------------------------------------------------------
def legacy(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our keys in VideoAlign's (transformers 4.45) naming, as its trainer saved them."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        out[prefix + key] = value.clone()
    return out


def model_config_json(folder: Path, output_dim: int = 1, stats: dict | None = TINY_REWARD_STATS, **peft) -> None:
    meta = {"data_config": {"max_frame_pixels": 56 * 56, "fps": 2.0, "num_frames": None, "eval_dim": ["VQ", "MQ", "TA"],
                            "prompt_template_type": "detailed_special", "sample_type": "uniform"},
            "model_config": {"model_name_or_path": str(folder.parent / "base"), "output_dim": output_dim,
                             "use_special_tokens": True, "reward_token": "special"},
            "peft_lora_config": {"lora_enable": bool(peft), **peft}}
    if stats is not None:
        meta["inference_config"] = stats
    (folder / "model_config.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, processor) -> Path:
    """A tiny Qwen2-VL base (LM head and processor included) with a larger vocabulary than the reward's, like
    Qwen2-VL-2B's 151936 rows that VideoAlign cut to its 151660 tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("videoalign") / "base"
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**tiny_qwen2vl_config(vocab_size=300))).save_pretrained(path)
    write_tiny_qwen2vl_processor(path)  # the processor beside the weights, as in Qwen/Qwen2-VL-2B-Instruct
    return path


def full_checkpoint(root: Path, reward: VideoReward, output_dim: int = 1, **kwargs) -> Path:
    folder = root / "VideoReward"
    (folder / "checkpoint-7").mkdir(parents=True)
    (folder / "checkpoint-3").mkdir()  # an older one: the highest step is loaded
    state = legacy(reward.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as Qwen2-VL-2B's
    torch.save(state, folder / "checkpoint-7" / "model.pth")
    model_config_json(folder, output_dim, **kwargs)
    return folder


def test_full_checkpoint_loads_and_scores_the_same(processor, base_model):
    reward = tiny(processor, output_dim=3, seed=2)
    torch.nn.init.normal_(reward.rm_head.weight)
    folder = full_checkpoint(base_model.parent, reward, output_dim=3)
    loaded = load_videoalign(folder, processor_name_or_path=processor, prompt_template=TINY_VIDEOREWARD_TEMPLATE)
    assert loaded.config["output_dim"] == 3 and loaded.config["max_pixels"] == 56 * 56
    assert loaded.config["reward_stats"] == TINY_REWARD_STATS and loaded.config["min_pixels"] == 128 * 28 * 28
    for key, value in reward.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded.min_pixels = reward.min_pixels  # the checkpoint keeps qwen-vl-utils' floor; compare on the same frames
    videos = quantised_video(1, 16, 56, 56)
    with torch.no_grad():
        expected = reward(videos, PROMPTS[:1], fps=8.0)["overall"]
        assert torch.equal(loaded(videos, PROMPTS[:1], fps=8.0)["overall"], expected)


def lora_checkpoint(root: Path, reward: VideoReward, r: int = 4, alpha: int = 8) -> tuple[Path, dict]:
    """A LoRA checkpoint of VideoAlign's layout; returns it and the merged weights expected (W + alpha/r * B @ A)."""
    folder = root / "VideoRewardLoRA"
    (folder / "checkpoint-5").mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    adapter, expected = {}, {}
    base = {k: v for k, v in reward.state_dict().items()}
    for key, weight in base.items():
        if ".layers." in key and key.endswith("proj.weight"):
            a, b = torch.randn(r, weight.shape[1], generator=g), torch.randn(weight.shape[0], r, generator=g)
            name = next(iter(legacy({key[:-len(".weight")]: weight}, "base_model.model.")))
            adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"] = a, b
            expected[key] = weight + alpha / r * b @ a
    from safetensors.torch import save_file

    save_file(adapter, folder / "checkpoint-5" / "adapter_model.safetensors")
    trained = ("rm_head.weight", "model.language_model.embed_tokens.weight", "model.visual.merger.mlp.0.weight")
    non_lora = legacy({k: reward.state_dict()[k] for k in trained}, "base_model.model.")
    torch.save(non_lora, folder / "checkpoint-5" / "non_lora_state_dict.pth")
    model_config_json(folder, lora_r=r, lora_alpha=alpha, use_rslora=False)
    return folder, expected


def test_lora_checkpoint_is_merged_into_the_base_weights(processor, base_model, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(base_model)
    reward = tiny(processor, seed=4)
    # the checkpoint's base weights are the base model's; its trained parts (head, embeddings, merger) are new
    reward.model.load_state_dict({**base.model.state_dict(), "language_model.embed_tokens.weight":
                                  torch.randn(266, 32), "visual.merger.mlp.0.weight": torch.randn(128, 128)})
    torch.nn.init.normal_(reward.rm_head.weight)
    (tmp_path / "base").symlink_to(base_model)
    folder, expected = lora_checkpoint(tmp_path, reward)
    loaded = load_videoalign(folder, processor_name_or_path=processor)
    state = loaded.state_dict()
    assert state.keys() == reward.state_dict().keys() and not any("lora" in k for k in state)
    for key, value in reward.state_dict().items():
        # merged: measured exact (0.0) here; the bound allows another float32 matmul order
        torch.testing.assert_close(state[key], expected.get(key, value), atol=1e-5, rtol=0, msg=key)
    assert state["model.language_model.embed_tokens.weight"].shape == (266, 32)  # base's 300 rows cut to 266


# -- bad checkpoints --------------------------------------------------------------------------------------------
class NotATensor:
    pass


def test_bad_folders_are_refused_naming_the_file(processor, checkout, base_model, tmp_path):
    reward = tiny(processor)
    empty = tmp_path / "empty"
    empty.mkdir()
    model_config_json(empty)
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no checkpoint-N folder; expected VideoAlign's layout"):
        convert_videoreward(empty, tmp_path / "out", processor_name_or_path=processor, **checkout)
    folder = full_checkpoint(tmp_path / "nostats", reward, stats=None)
    with pytest.raises(ValueError, match=f"{folder / 'model_config.json'} has no inference_config"):
        convert_videoreward(folder, tmp_path / "out", base_model=str(base_model), processor_name_or_path=processor,
                            **checkout)
    assert not (tmp_path / "out").exists()
    raw = load_videoalign(folder, str(base_model), normalize=False, processor_name_or_path=processor)
    assert raw.config["normalize"] is False


@pytest.mark.parametrize("payload, message", [
    ({"rm_head.weight": "weights"}, "holds a dict with non-tensor values"),
    ([torch.zeros(2)], "holds list"),
    (NotATensor(), "is not a weights-only state dict"),
])
def test_pth_files_holding_anything_but_tensors_are_refused(processor, checkout, base_model, tmp_path, payload,
                                                            message):
    folder = full_checkpoint(tmp_path, tiny(processor))
    pth = folder / "checkpoint-7" / "model.pth"
    with open(pth, "wb") as f:
        (torch.save(payload, f) if not isinstance(payload, NotATensor) else pickle.dump(payload, f))
    with pytest.raises(ValueError, match=message) as err:
        convert_videoreward(folder, tmp_path / "out", base_model=str(base_model), processor_name_or_path=processor,
                            **checkout)
    assert str(pth) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("rm_head.weight"), "missing key 'rm_head.weight'"),
    (lambda s: s.update({"visual.extra": torch.zeros(1)}), "unexpected key 'model.visual.extra'"),
    (lambda s: s.update({"model.norm.weight": torch.ones(33)}),
     r"key 'model.language_model.norm.weight' has shape \(33,\) in the checkpoint but \(32,\)"),
])
def test_state_dicts_that_do_not_fit_the_config_are_refused(processor, checkout, base_model, tmp_path, edit, message):
    folder = full_checkpoint(tmp_path, tiny(processor))
    pth = folder / "checkpoint-7" / "model.pth"
    state = torch.load(pth, weights_only=True)
    edit(state)
    torch.save(state, pth)
    with pytest.raises(ValueError, match=f"{pth} does not fit the model config: {message}"):
        convert_videoreward(folder, tmp_path / "out", base_model=str(base_model), processor_name_or_path=processor,
                            **checkout)
    assert not (tmp_path / "out").exists()


# -- the prompt template, read from a VideoAlign checkout --------------------------------------------------------
@pytest.mark.parametrize("assignment", [
    None,  # a triple-quoted literal, as VideoAlign writes it
    f"{PROMPT_NAME}: str = (" + " + ".join(repr(line) for line in TINY_VIDEOREWARD_TEMPLATE.splitlines(True)) + ")",
    f"{PROMPT_NAME} = (" + " ".join(repr(line) for line in TINY_VIDEOREWARD_TEMPLATE.splitlines(True)) + ")",
])
def test_template_is_read_from_a_checkout_without_running_it(tmp_path, assignment, monkeypatch):
    import reward_zoo.videoalign_checkpoint as checkpoint

    repo = write_checkout(tmp_path, assignment)
    assert read_prompt_template(repo, TEMPLATE_SHA256) == TINY_VIDEOREWARD_TEMPLATE
    assert not (tmp_path / "EXECUTED").exists()  # the module writes this file (then raises) if anything runs it
    monkeypatch.setattr(checkpoint, "PROMPT_SHA256", TEMPLATE_SHA256)  # as if this were the pinned revision's text
    assert read_prompt_template(repo) == TINY_VIDEOREWARD_TEMPLATE


@pytest.mark.parametrize("assignment, message", [
    (f"{PROMPT_NAME} = SHORT_PROMPT", r"is not a plain string literal \(found Name at line 6\)"),
    (f"{PROMPT_NAME} = f'{{DIMENSIONS}}'", r"is not a plain string literal \(found JoinedStr at line 6\)"),
    (f"{PROMPT_NAME} = open('/etc/hostname').read()", r"is not a plain string literal \(found Call at line 6\)"),
    ("OTHER = 'x'", f"assigns {PROMPT_NAME} 0 times at its top level; expected once"),
    (f"{PROMPT_NAME} = 'x'\n{PROMPT_NAME} = 'y'", f"assigns {PROMPT_NAME} 2 times"),
    (f"{PROMPT_NAME} = 'no field <|VQ_reward|> <|MQ_reward|> <|TA_reward|>'", r"it has \{text_prompt\} 0 times"),
])
def test_checkouts_without_a_usable_template_are_refused(tmp_path, assignment, message):
    import re

    repo = write_checkout(tmp_path, assignment)
    template = assignment.partition(" = ")[2]
    accepted = hashlib.sha256(template.strip("'").encode()).hexdigest()  # accepted, so the check after it is reached
    with pytest.raises(ValueError, match=re.escape(str(repo / "prompt_template.py")) + ".*" + message) as err:
        read_prompt_template(repo, accepted)
    assert "\n" not in str(err.value) and not (tmp_path / "EXECUTED").exists()
    with pytest.raises(FileNotFoundError, match="--videoalign_repo must be a checkout of .*VideoAlign"):
        read_prompt_template(tmp_path / "elsewhere")


# -- Hub layout -------------------------------------------------------------------------------------------------
def test_convert_then_load_from_the_hub_gives_the_same_scores(processor, checkout, base_model, tmp_path, hub):
    reward = tiny(processor, seed=5)
    torch.nn.init.normal_(reward.rm_head.weight)
    folder = full_checkpoint(tmp_path, reward)
    out = convert_videoreward(folder, tmp_path / "hub-layout", base_model=str(base_model),
                              processor_name_or_path=processor, **checkout)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "reward_class: reward_zoo.videoreward.VideoReward" in card
    assert "## Parity" in card and "2501.13918" in card and "219ab9db" in card and "fps" in card
    assert f"SHA-256 `{TEMPLATE_SHA256}`" in card and "--videoalign_repo" in card
    assert json.loads((out / "config.json").read_text())["prompt_template"] == TINY_VIDEOREWARD_TEMPLATE
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert_videoreward(folder, out, base_model=str(base_model), processor_name_or_path=processor,
                            **checkout)
    hub.commit("org/videoreward", out, "videoreward")
    loaded = create_reward("hf-hub:org/videoreward")
    converted = create_reward(str(out))
    videos = quantised_video(2, 16, 60, 60)
    with torch.no_grad():
        expected = converted(videos, PROMPTS, fps=8.0)
        for key, value in loaded(videos, PROMPTS, fps=8.0).items():
            assert torch.equal(value, expected[key]), key
    assert loaded.prompt_template == TINY_VIDEOREWARD_TEMPLATE
    converted.min_pixels = loaded.min_pixels = reward.min_pixels
    with torch.no_grad():
        torch.testing.assert_close(converted(videos, PROMPTS, fps=8.0)["overall"],
                                   reward(videos, PROMPTS, fps=8.0)["overall"])


# -- command lines ----------------------------------------------------------------------------------------------
def test_reward_zoo_convert_videoreward(processor, base_model, tmp_path):
    """The template's hash must be the pinned revision's, or the one --prompt_sha256 accepts; nothing is written
    otherwise."""
    from lit_videoalign.errors import UsageError
    from reward_zoo.cli import main

    reward = tiny(processor, seed=6)
    folder = full_checkpoint(base_model.parent / "cli", reward)
    (folder.parent / "base").symlink_to(base_model)
    repo = write_checkout(tmp_path / "VideoAlign")
    convert = ["convert", "videoreward", str(folder), str(tmp_path / "out"), "--videoalign_repo", str(repo)]
    with pytest.raises(UsageError, match="videoreward needs VideoAlign's prompt template.*pass --videoalign_repo"):
        main(convert[:4])
    with pytest.raises(ValueError, match=f"{repo / 'prompt_template.py'}: {PROMPT_NAME} has SHA-256 "
                                         f"{TEMPLATE_SHA256}, expected {PROMPT_SHA256} .*revision {REPO_REVISION}.*"
                                         f"pass --prompt_sha256 {TEMPLATE_SHA256} to accept"):
        main(convert)
    with pytest.raises(ValueError, match=f"SHA-256 {TEMPLATE_SHA256}, expected {'0' * 64} "):
        main([*convert, "--prompt_sha256", "0" * 64])
    with pytest.raises(UsageError, match="--videoalign_repo and --prompt_sha256 apply to videoreward only, not hpsv2"):
        main(["convert", "hpsv2", *convert[2:]])
    assert not (tmp_path / "out").exists()
    main([*convert, "--prompt_sha256", TEMPLATE_SHA256])
    loaded = create_reward(str(tmp_path / "out"))
    assert loaded.config["prompt_template"] == TINY_VIDEOREWARD_TEMPLATE
    assert loaded.config["processor_name_or_path"] == str(folder.parent / "base")  # model_config.json's base
    for key, value in reward.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="samples frames by time .*drop --num_frames 8"):
        main([*convert[:3], str(tmp_path / "out2"), "--num_frames", "8", *convert[4:]])
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("config", ["configs/toyworld/grpo.yaml", "configs/toyworld/reward_gradient.yaml"])
def test_toyworld_training_runs_two_steps_with_videoreward(config, tmp_path, monkeypatch):
    """GRPO and reward-gradient fine-tuning of the toy base, scored by a tiny random videoreward at the toy world's
    8 fps (the backbone's), through the videoalign command line."""
    from test_cli import ROOT, tiny_overrides

    from lit_videoalign.cli import main

    monkeypatch.chdir(ROOT)
    calls = []
    forward = VideoReward.forward

    def spy(self, videos, prompts=None, references=None, fps=None):
        calls.append((tuple(videos.shape), fps, videos.requires_grad))
        return forward(self, videos, prompts, references, fps)

    monkeypatch.setattr(VideoReward, "forward", spy)
    weights = write_tiny_videoreward(tmp_path / "videoreward")
    reward = {"class_path": "reward_zoo.create_reward", "init_args": {"name_or_hub_id": str(weights)}}
    args = tiny_overrides(config, tmp_path, "unused", tmp_path, "unused")
    main(["fit", "--config", config, *args, f"--model.init_args.reward={json.dumps(reward)}",
          "--trainer.limit_val_batches=0"])
    assert calls and {fps for _, fps, _ in calls} == {8.0}  # the toy world's frame rate (the backbone's)
    assert all(shape[1:] == (16, 3, 32, 32) for shape, _, _ in calls)
    if "reward_gradient" in config:
        assert all(grad for _, _, grad in calls)  # the reward's gradient drives the update


def test_reward_zoo_score_reads_each_files_frame_rate(tmp_path):
    """A 2-second clip at 16 fps and one at 8 fps: both become 4 sampled frames, because the frame rate comes from
    the file; scores equal the in-memory call with that fps."""
    from lit_videoalign.video_io import read_video, write_mp4
    from reward_zoo.cli import score_files

    weights = write_tiny_videoreward(tmp_path / "videoreward")
    clips = {"fast.mp4": (torch.rand(32, 3, 56, 56), 16), "slow.mp4": (torch.rand(16, 3, 56, 56), 8)}
    for name, (video, fps) in clips.items():
        write_mp4(video, tmp_path / name, fps=fps)
    rows = score_files(str(weights), [str(tmp_path / n) for n in clips], prompts=PROMPTS)
    reward = create_reward(str(weights))
    for row, (name, (_, fps)) in zip(rows, clips.items()):
        with torch.no_grad():
            expected = reward(read_video(tmp_path / name)[None], [row["prompt"]], fps=float(fps))["overall"]
        assert row["overall"] == pytest.approx(float(expected), abs=1e-6)  # measured: exact (same decode)
    with torch.no_grad():  # the wrong frame rate samples 8 frames of the fast clip instead of 4: another score
        wrong = reward(read_video(tmp_path / "fast.mp4")[None], [PROMPTS[0]], fps=8.0)["overall"]
    assert rows[0]["overall"] != pytest.approx(float(wrong), abs=1e-6)
