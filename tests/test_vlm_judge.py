"""vlm_judge: scores read from the next-token distribution of tiny random Qwen2-VL and Qwen2.5-VL checkpoints, checked
against a hand computation through transformers' own processor path (PIL frames, AutoProcessor, the model, a softmax
over the answer tokens); pairwise symmetry; batching; determinism and seeded chain of thought; bad configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lit_videoalign.testing import tiny_qwen2vl_config, write_tiny_qwen2vl_processor
from reward_zoo import create_reward, reward_info
from reward_zoo.videoreward import sample_frame_indices

PROMPTS = ["a red ball falls", "a blue {cube} slides left", "two balls"]  # braces: substituted, never formatted
FPS, FRAMES, SIZE = 8.0, 8, 56  # 1 s at 8 fps sampled at 2 fps -> 4 frames (the minimum): 2 temporal patches of 4x4
SMALL = {"min_pixels": 28 * 28, "max_pixels": SIZE * SIZE}  # 56 x 56 frames are kept as they are
VIDEO_KWARGS = {"do_rescale": True, "do_sample_frames": False,
                "size": {"shortest_edge": SMALL["min_pixels"], "longest_edge": SMALL["max_pixels"]}}
LM_GAIN = 15.0  # the tiny models' logits are near zero; scaled up, the answer distributions are far from uniform
QWEN25_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                 "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                 "fullatt_block_indexes": [1], "window_size": 56, "tokens_per_second": 2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random Qwen2-VL and Qwen2.5-VL checkpoints, each with its processor (the tiny byte-level tokenizer plus
    "Yes" and "No" as whole tokens); the LM head is scaled up so the answer distributions are far from uniform."""
    from transformers import (
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("vlm_judge")
    proc = AutoProcessor.from_pretrained(write_tiny_qwen2vl_processor(root / "processor"))
    proc.tokenizer.add_tokens(["Yes", "No"])  # ids 263, 264 (the tiny config's vocabulary holds 266)
    qwen25 = Qwen2_5_VLProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                                 video_processor=proc.video_processor, chat_template=proc.chat_template)
    builds = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLConfig(**tiny_qwen2vl_config()), proc),
              "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration,
                             Qwen2_5_VLConfig(**{**tiny_qwen2vl_config(), "vision_config": QWEN25_VISION}), qwen25)}
    paths = {}
    for name, (model_class, config, processor) in builds.items():
        torch.manual_seed(0)
        model = model_class(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(LM_GAIN)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def judge(path: str, **kwargs):
    return create_reward("vlm_judge", pretrained_model_name_or_path=path, **{**SMALL, **kwargs})


def videos(b: int, seed: int = 0) -> torch.Tensor:
    """Videos whose pixels are exact 8-bit values, so the processor's uint8 frames are the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, FRAMES, 3, SIZE, SIZE), generator=g).float() / 255


def answer_probs(reward, folder: str, messages: list, clips: list[torch.Tensor], tokens: list[str]) -> torch.Tensor:
    """By hand: the sampled frames as PIL images through the checkpoint's AutoProcessor, one sequence, the model's
    last logits, softmax over the answer tokens' ids."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    idx = sample_frame_indices(FRAMES, FPS, 2.0)
    pil = [[Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in clip[idx]] for clip in clips]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = proc(text=[text], videos=pil, return_tensors="pt", videos_kwargs=VIDEO_KWARGS)
    if "second_per_grid_ts" in batch:  # Qwen2.5-VL: 2 frames per temporal patch at the sampled rate, 0.5 s
        batch["second_per_grid_ts"] = torch.full((len(clips),), 2 / (len(idx) / (FRAMES / FPS)))
    ids = [proc.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    with torch.no_grad():
        return reward.model(**batch).logits[0, -1, ids].softmax(-1)


# -- scores equal the hand computation ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_rating_is_the_expected_value_over_the_rating_tokens(checkpoints, model_type):
    reward = judge(checkpoints[model_type])
    assert reward.model_type == model_type and reward.dimensions == ("visual_quality", "text_alignment",
                                                                      "physical_consistency")
    v = videos(2)
    scores = reward(v, PROMPTS[:2], fps=FPS)
    scale = torch.arange(1.0, 6.0)
    for i in range(2):
        by_hand = []
        for dim, description in reward.questions.items():
            p = answer_probs(reward, checkpoints[model_type], reward.point_messages(PROMPTS[i], description), [v[i]],
                             ["1", "2", "3", "4", "5"])
            by_hand.append(((p @ scale) - 1) / 4)
            torch.testing.assert_close(scores[dim][i], by_hand[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(scores["overall"][i], torch.stack(by_hand).mean(), atol=1e-5, rtol=0)
    raw = judge(checkpoints[model_type], normalize=False)(v, PROMPTS[:2], fps=FPS)
    torch.testing.assert_close(raw["overall"], scores["overall"] * 4 + 1, atol=1e-5, rtol=0)
    assert reward.score_ranges["overall"] == (0.0, 1.0) and reward.expected_fps == 2.0
    info = reward_info("vlm_judge")
    assert info["differentiable"] is False and info["requires_prompts"] is True and info["license"] is None
    assert info["paper_url"] == "https://arxiv.org/abs/2509.22799"


def test_yes_no_is_the_probability_of_yes(checkpoints):
    reward = judge(checkpoints["qwen2_vl"], template="unifiedreward", answer="yes_no")
    assert reward.dimensions == () and reward.pairwise_dimensions == ()
    v = videos(2, seed=1)
    scores = reward(v, PROMPTS[:2], fps=FPS)
    assert set(scores) == {"overall"}
    description = reward.questions["overall"]
    for i in range(2):
        p = answer_probs(reward, checkpoints["qwen2_vl"], reward.point_messages(PROMPTS[i], description), [v[i]],
                         ["Yes", "No"])
        torch.testing.assert_close(scores["overall"][i], p[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_pairwise_is_the_symmetrised_probability_of_a(checkpoints, model_type):
    reward = judge(checkpoints[model_type], dimensions={"looks": "visual quality", "follows": "prompt following"},
                   template="Prompt: {prompt}. Rate the {dimension}.")
    a, b = videos(2, seed=2), videos(2, seed=3)
    ab = reward.compare(a, b, PROMPTS[:2], fps=FPS)
    ba = reward.compare(b, a, PROMPTS[:2], fps=FPS)
    assert set(ab) == {"looks", "follows", "overall"}
    for key in ab:
        torch.testing.assert_close(ab[key] + ba[key], torch.ones(2), atol=1e-6, rtol=0)
    first, order_effect = [], []
    for i in range(2):
        by_hand = []
        for dim, description in reward.questions.items():
            messages = reward.pair_messages(PROMPTS[i], description)
            p_ab = answer_probs(reward, checkpoints[model_type], messages, [a[i], b[i]], ["A", "B"])[0]
            p_ba = answer_probs(reward, checkpoints[model_type], messages, [b[i], a[i]], ["A", "B"])[0]
            by_hand.append((p_ab + 1 - p_ba) / 2)
            first.append(abs(p_ab - 0.5))
            order_effect.append(abs(p_ab - p_ba))
            torch.testing.assert_close(ab[dim][i], by_hand[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(ab["overall"][i], torch.stack(by_hand).mean(), atol=1e-5, rtol=0)
    # the check has teeth: P(A) alone is far from the symmetrised value, and the order of the videos moves it by more
    # than the tolerance (so reading the orders the wrong way round would fail)
    assert max(first) > 0.05 and max(order_effect) > 1e-4
    assert '"a {cube}"' in reward.pair_messages("a {cube}", "x")[0]["content"][-1]["text"]  # braces stay as written
    assert "Prompt: a {cube}. Rate the x." in reward.point_messages("a {cube}", "x")[0]["content"][-1]["text"]
    same = reward.compare(a, a, PROMPTS[:2], fps=FPS)["overall"]
    torch.testing.assert_close(same, torch.full((2,), 0.5), atol=1e-6, rtol=0)


# -- batching and determinism ---------------------------------------------------------------------------------------
def test_a_batch_scores_as_its_items_one_by_one(checkpoints):
    reward = judge(checkpoints["qwen2_5_vl"], batch_size=2)  # 9 questions in chunks of 2, prompts of unequal length
    v = videos(3, seed=4)
    batched = reward(v, PROMPTS, fps=FPS)
    single = [reward(v[i:i + 1], PROMPTS[i:i + 1], fps=FPS) for i in range(3)]
    for key in batched:
        torch.testing.assert_close(batched[key], torch.cat([s[key] for s in single]), atol=1e-5, rtol=0)
    pairs = reward.compare(v, v.flip(0), PROMPTS, fps=FPS)
    pairs_single = [reward.compare(v[i:i + 1], v.flip(0)[i:i + 1], PROMPTS[i:i + 1], fps=FPS) for i in range(3)]
    torch.testing.assert_close(pairs["overall"], torch.cat([s["overall"] for s in pairs_single]), atol=1e-5, rtol=0)


def test_scores_are_deterministic_and_chain_of_thought_is_seeded(checkpoints):
    v = videos(2, seed=5)
    plain = judge(checkpoints["qwen2_vl"])
    first = plain(v, PROMPTS[:2], fps=FPS)
    second = plain(v, PROMPTS[:2], fps=FPS)
    assert all(torch.equal(first[k], second[k]) for k in first) and plain.last_rationales == []

    def cot(seed: int):
        reward = judge(checkpoints["qwen2_vl"], chain_of_thought=True, max_new_tokens=6, seed=seed,
                       template="unifiedreward")
        state = torch.get_rng_state()
        scores = reward(v, PROMPTS[:2], fps=FPS)
        assert torch.equal(torch.get_rng_state(), state)  # the rationale's sampling leaves the caller's RNG alone
        return scores["overall"], list(reward.last_rationales)

    (s1, r1), (s2, r2), (_, r3) = cot(0), cot(0), cot(1)
    assert len(r1) == 2 and all(r1) and r1 == r2 and torch.equal(s1, s2)
    assert r1 != r3  # another seed samples another rationale


def test_chain_of_thought_reads_the_score_after_the_rationale_and_cue(checkpoints):
    from reward_zoo.vlm_judge_templates import SCORE_CUE

    reward = judge(checkpoints["qwen2_vl"], chain_of_thought=True, max_new_tokens=4, template="unifiedreward")
    v = videos(1, seed=6)
    score = reward(v, PROMPTS[:1], fps=FPS)["overall"]
    messages = reward.point_messages(PROMPTS[0], reward.questions["overall"])
    clip = reward.encode_videos(v, FPS)
    text = reward.chat_text(messages, [clip[0][1]]) + reward.last_rationales[0] + SCORE_CUE
    with torch.no_grad():
        logits = reward.model(**reward.model_inputs([text], clip)).logits[0, -1]
    p = logits[reward.score_ids].softmax(-1)
    torch.testing.assert_close(score[0], (p @ torch.arange(1.0, 6.0) - 1) / 4, atol=1e-5, rtol=0)


# -- errors -----------------------------------------------------------------------------------------------------------
def test_bad_configurations_and_calls_are_refused(checkpoints, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"supports model_type \['qwen2_5_vl', 'qwen2_vl'\].*'llava'"):
        judge(str(tmp_path))
    with pytest.raises(ValueError, match=r"answer token '10' is 2 tokens"):
        judge(checkpoints["qwen2_vl"], rating_scale=["1", "5", "10"])
    with pytest.raises(ValueError, match="template must be one of"):
        judge(checkpoints["qwen2_vl"], template="videoscore")
    with pytest.raises(ValueError, match=r"must hold \{dimension\}"):
        judge(checkpoints["qwen2_vl"], template="Rate {prompt}", dimensions=["looks", "moves"])
    reward = judge(checkpoints["qwen2_vl"])
    v = videos(2)
    with pytest.raises(ValueError, match="needs the videos' frame rate"):
        reward(v, PROMPTS[:2])
    with pytest.raises(ValueError, match="needs the videos' frame rate"):
        reward.compare(v, v, PROMPTS[:2])
    with pytest.raises(ValueError, match="needs prompts"):
        reward(v, None, fps=FPS)
    with pytest.raises(ValueError, match="needs prompts"):
        reward.compare(v, v, None, fps=FPS)
    with pytest.raises(ValueError, match="videos_a has 2 items but videos_b has 1"):
        reward.compare(v, v[:1], PROMPTS[:2], fps=FPS)


def test_shipped_configs_build_the_judge_with_its_init_args(checkpoints):
    from reward_zoo.vlm_judge import VLMJudge

    folder = Path(__file__).resolve().parent.parent / "reward_zoo" / "configs"
    for name, template in (("vlm_judge_videoscore2", "videoscore2"), ("vlm_judge_unifiedreward", "unifiedreward")):
        spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert spec["class_path"] == "reward_zoo.vlm_judge.VLMJudge" and spec["init_args"]["template"] == template
        args = {**spec["init_args"], "pretrained_model_name_or_path": checkpoints["qwen2_5_vl"], "dtype": "float32"}
        reward = VLMJudge(**args)
        assert {key: reward.config[key] for key in args} == args  # config.json holds the YAML's init_args
