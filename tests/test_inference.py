"""Inference-time alignment: zero-scale guidance is plain sampling bit for bit, best-of-N picks the argmax, noise search
keeps to its NFE budget and never loses its best, gradient methods refuse rewards without a useful gradient."""

import math

import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.inference import (
    best_of_n,
    noise_search,
    require_differentiable,
    reward_guided_sample,
    sample_from_noise,
)
from lit_videoalign.inference.base import seeded_candidates
from lit_videoalign.inference.noise_search import perturb_noise
from lit_videoalign.inference.reward_guidance import guided_steps, normalize_per_sample, predicted_x0
from lit_videoalign.objectives.dmd import DMD
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import Brightness
from reward_zoo.composite import CompositeReward

PROMPTS = ["a red ball falls", "a blue ball moves left"]
STUDENT_SIGMAS = [1.0, 0.8, 0.4]  # off the 3-step Euler grid (1, 2/3, 1/3), so the sigmas show whose sampler ran


class Judge(Brightness):
    """A verifier without gradients (e.g. a rule checker or an API)."""

    differentiable = False


@pytest.fixture(scope="module")
def model(tiny_pixel_pipeline):
    torch.manual_seed(0)
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    return SFT(bb, num_inference_steps=3, guidance_scale=2.0)


@pytest.fixture(scope="module")
def student(tiny_pixel_pipeline):
    torch.manual_seed(0)
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    return DMD(bb, num_inference_steps=3, student_sigmas=STUDENT_SIGMAS)


def count_denoiser_calls(monkeypatch, model) -> list[tuple[int, float]]:
    """Record ``(rows, sigma)`` of every velocity prediction of ``model``'s backbone from now on (samplers call it
    with one sigma for the whole batch)."""
    calls, predict = [], model.backbone.predict_velocity

    def counting(x, sigma, cond, **kwargs):
        (s,) = set(torch.as_tensor(sigma).flatten().tolist())
        calls.append((x.shape[0], s))
        return predict(x, sigma, cond, **kwargs)

    monkeypatch.setattr(model.backbone, "predict_velocity", counting)
    return calls


# -- pure maths ------------------------------------------------------------------------------------------------------
# allclose's default rtol 1e-5 in these stands for float32 rounding: measured exact or within 1.1e-7 relative
# (torch 2.13.0 / 2.14.1).
def test_predicted_x0_and_gradient_normalisation_by_hand():
    x, v = torch.full((2, 1, 1, 1, 2), 1.0), torch.tensor([2.0, -2.0]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 2)
    assert torch.equal(predicted_x0(x, v, 0.25), torch.tensor([0.5, 1.5]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 2))
    assert torch.equal(predicted_x0(x, v, torch.tensor([0.5, 1.0])).flatten(1)[:, 0], torch.tensor([0.0, 3.0]))
    # x0 is the clean sample the straight path points to: x = (1 - s) x0 + s n, v = n - x0
    x0, n = torch.randn(3, 2, 2, 2, 2), torch.randn(3, 2, 2, 2, 2)
    # float32 rounding on the scale of x0 and n: measured 8.6e-8 of max |x0| (torch 2.13.0 / 2.14.1, 3 seeds,
    # AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 100x that
    torch.testing.assert_close(predicted_x0(0.7 * x0 + 0.3 * n, n - x0, 0.3), x0, rtol=0,
                               atol=1e-5 * x0.abs().max().item())
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # rms 5/sqrt(2) and 0
    assert torch.allclose(normalize_per_sample(g), torch.tensor([[3.0, 4.0], [0.0, 0.0]]) * math.sqrt(2) / 5)


def test_guided_steps_and_perturbation():
    assert guided_steps(5, None) == [0, 1, 2, 3, 4]
    assert guided_steps(5, (1, 3)) == [1, 2] and guided_steps(5, (3, None)) == [3, 4]
    with pytest.raises(ValueError, match="step_range"):
        guided_steps(5, (2, 9))
    n, e = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(perturb_noise(n, e, 0.6), torch.tensor([0.8, 0.6]))  # sqrt(1 - 0.36) = 0.8
    assert torch.equal(perturb_noise(n, e, 1.0), e)
    big = perturb_noise(torch.randn(200_000), torch.randn(200_000), 0.5)
    assert abs(big.std().item() - 1.0) < 0.01  # still standard normal (0.01 is 6 standard errors of the std)
    with pytest.raises(ValueError, match="strength"):
        perturb_noise(n, e, 0.0)


# -- reward guidance -------------------------------------------------------------------------------------------------
def test_zero_scale_guidance_is_plain_sampling_bit_exact(model):
    plain = model.generate(PROMPTS, seeds=[3, 4], sampler="euler")  # guidance steers the Euler ODE
    for backprop in (True, False):
        guided = reward_guided_sample(model, PROMPTS, Brightness(), seeds=[3, 4], scale=0.0,
                                      backprop_denoiser=backprop)
        assert torch.equal(guided.videos, plain)
        assert guided.info["guided_reward"].shape == (2, 3)  # the reward and its gradient were computed
    assert guided.nfe == 3 * 2  # three guided steps, two guidance branches


def test_guidance_raises_the_reward_and_only_in_its_step_range(model):
    reward = Brightness()
    plain = model.generate(PROMPTS, seeds=[3, 4], sampler="euler")
    guided = reward_guided_sample(model, PROMPTS, reward, seeds=[3, 4], scale=0.2)
    assert (guided.scores > reward(plain)["overall"]).all()
    assert guided.info["denoiser_backward"] == 3 * 2
    late = reward_guided_sample(model, PROMPTS, reward, seeds=[3, 4], scale=0.2, step_range=(2, None),
                                num_inference_steps=3)
    assert late.info["guided_steps"] == [2]
    assert not torch.equal(late.videos, plain) and not torch.equal(late.videos, guided.videos)


def test_sample_from_noise_matches_generate(model):
    noise = model.initial_noise([7, 8])
    plain = model.generate(PROMPTS, seeds=[7, 8])
    assert torch.equal(sample_from_noise(model, PROMPTS, noise), plain)
    # Another batching rounds differently. Videos lie in [0, 1], so atol is relative to that range: measured 4.8e-7
    # (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 20x that.
    torch.testing.assert_close(sample_from_noise(model, PROMPTS, noise, batch_size=1), plain, rtol=0, atol=1e-5)


def test_gradient_methods_refuse_rewards_without_a_useful_gradient(model):
    with pytest.raises(ValueError, match="Judge has differentiable=False"):
        reward_guided_sample(model, PROMPTS, Judge(), scale=1.0)
    zscored = CompositeReward({"a": Brightness(), "b": Brightness()}, {"a": 1.0, "b": 1.0}, normalize="zscore")
    with pytest.raises(ValueError, match="normalize='zscore'"):
        require_differentiable(zscored, "reward guidance")
    nested = CompositeReward({"ok": Brightness(), "judge": Judge()}, {"ok": 1.0, "judge": 1.0})
    with pytest.raises(ValueError, match="sub-reward 'judge'.*Judge has differentiable=False"):
        require_differentiable(nested, "reward guidance")
    require_differentiable(CompositeReward({"a": Brightness()}, {"a": 1.0}), "reward guidance")  # fine


# -- best-of-N -------------------------------------------------------------------------------------------------------
def test_best_of_n_returns_the_argmax_and_its_score(model):
    reward = Brightness()
    res = best_of_n(model, PROMPTS, reward, n=4, seeds=[3, 4], batch_size=3, return_candidates=True)
    assert res.all_scores.shape == (2, 4) and res.nfe == 4 * 3 * 2
    cands = res.info["candidates"]  # (b, n, t, c, h, w)
    for i in range(2):
        j = int(res.all_scores[i].argmax())
        assert res.info["best_index"][i] == j
        assert torch.equal(res.videos[i], cands[i, j])
        assert torch.allclose(reward(cands[i])["overall"], res.all_scores[i])  # measured exact (torch 2.13.0 / 2.14.1)
        assert res.scores[i] == res.all_scores[i].max() >= res.all_scores[i].mean()
    assert res.all_scores.std(dim=1).min() > 0  # the candidates differ
    # candidate 0 is the plain sample of the prompt's seed, so best-of-1 is plain sampling. Both measured bit-identical
    # (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 of the [0, 1] range allows
    # another batching (4.8e-7 measured above)
    assert torch.allclose(cands[:, 0], model.generate(PROMPTS, seeds=[3, 4]), rtol=0, atol=1e-5)
    one = best_of_n(model, PROMPTS, reward, n=1, seeds=[3, 4])
    assert torch.allclose(one.videos, cands[:, 0], rtol=0, atol=1e-5)
    assert res.info["seeds"][0] == res.info["candidate_seeds"][0][res.info["best_index"][0]]
    with pytest.raises(ValueError, match="n must be a positive integer"):
        best_of_n(model, PROMPTS, reward, n=0)


# -- noise search ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["greedy", "random"])
def test_noise_search_keeps_to_its_budget_and_never_loses_its_best(model, mode):
    reward = Brightness()
    cost = 2 * 2  # steps x guidance branches
    res = noise_search(model, PROMPTS, reward, budget_nfe=5 * cost + cost - 1, seeds=[3, 4], mode=mode,
                       population=2, perturbation=0.5, num_inference_steps=2)
    assert res.nfe == 5 * cost and res.info["samples"] == 5 and res.info["rounds"] == 3  # 2 + 2 + 1
    history = res.info["history"]
    assert history.shape == (2, 3) and (history[:, 1:] >= history[:, :-1]).all()
    assert torch.allclose(res.scores, reward(res.videos)["overall"])  # measured exact (torch 2.13.0 / 2.14.1)
    assert torch.equal(res.scores, res.all_scores.max(1).values)
    plain = reward(model.generate(PROMPTS, seeds=[3, 4], num_inference_steps=2))["overall"]
    # the first candidate is the plain sample; measured never below it, 1e-6 (16 ulp of a score near 0.5) is slack
    assert (res.scores >= plain - 1e-6).all()
    if mode == "greedy":  # the winner's noise reproduces the winner: measured bit-identical; 1e-5 of the [0, 1] range
        assert torch.allclose(sample_from_noise(model, PROMPTS, res.info["noise"], num_inference_steps=2), res.videos,
                              rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="below the cost of one sample"):
        noise_search(model, PROMPTS, reward, budget_nfe=3 * 2 - 1)


# -- a few-step student ----------------------------------------------------------------------------------------------
def test_best_of_n_and_noise_search_sample_a_dmd_student_with_its_own_sampler(student, monkeypatch):
    reward = Brightness()
    calls = count_denoiser_calls(monkeypatch, student)
    res = best_of_n(student, PROMPTS, reward, n=3, seeds=[3, 4], return_candidates=True)
    assert res.nfe == 3 * 3  # candidates x student steps (no guidance)
    assert sum(rows for rows, _ in calls) == len(PROMPTS) * res.nfe  # NFE per video as counted at the denoiser
    assert sorted({round(s, 6) for _, s in calls}, reverse=True) == STUDENT_SIGMAS  # the student's sigmas, not Euler's
    # another batching: measured 3.0e-7 of the [0, 1] range (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 /
    # baseline CPU kernels); 1e-5 is 30x that
    assert torch.allclose(res.info["candidates"][:, 0], student.generate(PROMPTS, seeds=[3, 4]), rtol=0, atol=1e-5)

    calls.clear()
    res = noise_search(student, PROMPTS, reward, budget_nfe=4 * 3 + 2, seeds=[3, 4], population=2)
    assert res.nfe == 4 * 3 and res.info["samples"] == 4  # four samples of three steps fit the budget
    assert sum(rows for rows, _ in calls) == len(PROMPTS) * res.nfe
    assert sorted({round(s, 6) for _, s in calls}, reverse=True) == STUDENT_SIGMAS
    plain = reward(student.generate(PROMPTS, seeds=[3, 4]))["overall"]
    assert (res.scores >= plain - 1e-6).all()  # the first candidate is the student's plain sample (as above)
    again = sample_from_noise(student, PROMPTS, res.info["noise"],
                              generators=seeded_candidates(student, res.info["seeds"])[1])
    # noise and seed reproduce a re-noising student's winner: measured 3.0e-7 of the [0, 1] range; 1e-5 is 30x that
    assert torch.allclose(again, res.videos, rtol=0, atol=1e-5)


def test_reward_guidance_refuses_a_student_with_its_own_sampler(student):
    with pytest.raises(ValueError, match="DMD samples with its own sampler"):
        reward_guided_sample(student, PROMPTS, Brightness(), scale=0.1)
