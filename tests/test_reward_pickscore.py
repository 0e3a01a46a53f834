"""reward_zoo.pickscore: PickScore loads a transformers CLIPModel and its CLIP processor, scores frames as the authors'
README does (``logit_scale.exp() * cos``, with ``CLIPProcessor`` on PIL images), averages sampled frames, and is
differentiable. Tiny random CLIP weights: no real checkpoint here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

from lit_videoalign.testing import write_tiny_clip
from reward_zoo import create_reward, reward_info
from reward_zoo.pickscore import PickScore

PROMPTS = ["a red ball falls", "a blue ball moves left and bounces"]


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory) -> str:
    """A tiny random CLIP folder with a tokenizer and a 32 px ``CLIPImageProcessor`` (the PickScore layout)."""
    path = tmp_path_factory.mktemp("pickscore") / "tiny"
    write_tiny_clip(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def reference_scores(path: str, frames_u8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore as its README computes it, per video: ``CLIPProcessor`` on PIL frames, ``get_*_features``,
    normalise, ``logit_scale.exp() * text @ image.T``, then the mean over the frames. ``frames_u8``: (b, k, h, w, 3)."""
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    out = []
    with torch.no_grad():
        for frames, prompt in zip(frames_u8, prompts):
            images = processor(images=[Image.fromarray(f.numpy()) for f in frames], return_tensors="pt")
            text = processor(text=[prompt], padding=True, truncation=True, max_length=32, return_tensors="pt")
            image_embs = model.get_image_features(**images).pooler_output
            text_embs = model.get_text_features(**text).pooler_output
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            out.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).mean())
    return torch.stack(out)


def uint8_videos(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_is_registered_with_its_card_facts():
    info = reward_info("pickscore")
    assert info["family"] == "pickscore" and info["dimensions"] == ["preference"] and info["differentiable"]
    assert info["requires_prompts"] and info["license"] == "mit" and info["paper_url"].endswith("2305.01569")


@pytest.mark.parametrize("size, atol", [
    # Frames at the model's 32 px: no resampling, so the two paths differ by float round-off only. Measured max
    # |diff| 7.2e-7 on scores of scale logit_scale.exp() = 14.3 (torch 2.14.1, CPU float32); 1e-5 is 14x that.
    ((32, 32), 1e-5),
    # Resized frames: PIL resamples 8-bit images, the reward resamples float tensors (differentiably). Measured max
    # |diff| 4.7e-3 (48x64) and 4.2e-3 (90x40) on scores of scale 14.3, i.e. 3e-4 of the score range; 2e-2 is ~4x.
    ((48, 64), 2e-2),
    ((90, 40), 2e-2),
])
def test_scores_equal_the_readme_computation_on_pil_frames(tiny_pickscore, size, atol):
    reward = create_reward("pickscore", model_name_or_path=tiny_pickscore, processor_name_or_path=tiny_pickscore,
                           num_frames=3)
    u8 = uint8_videos(2, 5, *size)
    videos = u8.permute(0, 1, 4, 2, 3).float() / 255  # (b, t, c, h, w) in [0, 1]
    with torch.no_grad():
        scores = reward(videos, PROMPTS)
    expected = reference_scores(tiny_pickscore, u8[:, [0, 2, 4]], PROMPTS)  # 3 of 5 frames: first, middle, last
    torch.testing.assert_close(scores["preference"], expected, atol=atol, rtol=0)
    assert torch.equal(scores["overall"], scores["preference"])


def test_ranking_follows_the_reference_ranking(tiny_pickscore):
    """On random weights "the frame that matches the prompt" is only what the reference computation says: the reward
    must order frames as PickScore's README computation does (parity of the ranking, not semantics)."""
    reward = create_reward("pickscore", model_name_or_path=tiny_pickscore, processor_name_or_path=tiny_pickscore,
                           num_frames=1)
    u8 = uint8_videos(8, 1, 32, 32, seed=3)
    with torch.no_grad():
        ours = reward(u8.permute(0, 1, 4, 2, 3).float() / 255, [PROMPTS[0]] * 8)["overall"]
    ref = reference_scores(tiny_pickscore, u8, [PROMPTS[0]] * 8)
    assert torch.equal(ours.argsort(), ref.argsort())
    assert ours[ref.argmax()] > ours[ref.argmin()]


def test_gradients_reach_the_pixels_of_sampled_frames(tiny_pickscore):
    reward = create_reward("pickscore", model_name_or_path=tiny_pickscore, processor_name_or_path=tiny_pickscore,
                           num_frames=2)
    videos = torch.rand(2, 3, 3, 24, 40, requires_grad=True)
    reward(videos, PROMPTS)["overall"].sum().backward()
    assert torch.isfinite(videos.grad).all()
    assert videos.grad[:, [0, 2]].abs().sum() > 0 and videos.grad[:, 1].abs().sum() == 0


def test_clip_weights_stay_out_of_the_state_dict_and_fps_is_ignored(tiny_pickscore, tmp_path):
    reward = create_reward("pickscore", model_name_or_path=tiny_pickscore, processor_name_or_path=tiny_pickscore)
    assert reward.state_dict() == {} and reward.num_frames == 8  # frozen backbone named by config.json
    videos = torch.rand(1, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reward(videos, PROMPTS[:1], fps=16)["overall"], reward(videos, PROMPTS[:1])["overall"])
    reward.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "license: mit" in card and "expected_resolution:" in card and "Parity:" in card and "f79607f" in card
    loaded = create_reward(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded(videos, PROMPTS[:1])["overall"], reward(videos, PROMPTS[:1])["overall"])


def test_bad_arguments_get_one_line_errors(tiny_pickscore, tmp_path):
    with pytest.raises(ValueError, match="num_frames must be a positive integer or None, got 0"):
        PickScore(model_name_or_path=tiny_pickscore, processor_name_or_path=tiny_pickscore, num_frames=0)
    write_tiny_clip(tmp_path / "no-processor")  # no preprocessor_config.json
    with pytest.raises(ValueError, match="cannot load a CLIPImageProcessor from .*no-processor"):
        PickScore(model_name_or_path=tiny_pickscore, processor_name_or_path=str(tmp_path / "no-processor"))
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(
        tmp_path / "no-processor")
    with pytest.raises(ValueError, match="expected a shortest-edge resize and a centre crop to .* image_size 32"):
        PickScore(model_name_or_path=tiny_pickscore, processor_name_or_path=str(tmp_path / "no-processor"))
    reward = PickScore(model_name_or_path=tiny_pickscore, processor_name_or_path=tiny_pickscore)
    with pytest.raises(ValueError, match="needs prompts"):
        reward(torch.rand(1, 2, 3, 32, 32))
    assert np.isclose(float(reward.scale), float(CLIPModel.from_pretrained(tiny_pickscore).logit_scale.detach().exp()))


@pytest.mark.parametrize("config", ["configs/toyworld/grpo.yaml", "configs/toyworld/reward_gradient.yaml"])
def test_grpo_and_reward_gradient_run_two_steps_through_the_cli(tiny_pickscore, config, tmp_path, capsys):
    """The toy world's GRPO and reward-gradient recipes with ``pickscore`` (tiny random CLIP) as their reward."""
    import json

    from test_cli import tiny_overrides

    from lit_videoalign.cli import main

    spec = {"class_path": "reward_zoo.pickscore.PickScore",
            "init_args": {"model_name_or_path": tiny_pickscore, "processor_name_or_path": tiny_pickscore,
                          "num_frames": 2}}
    main(["fit", "--config", config, *tiny_overrides(config, tmp_path, "", tmp_path, ""),
          f"--model.init_args.reward={json.dumps(spec)}"])
    out = capsys.readouterr().out
    assert "2 steps" in out and (tmp_path / "pipeline" / "model_index.json").is_file()
