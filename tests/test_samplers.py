"""The pure samplers of ``schedules/samplers.py`` by hand: the predicted x0, classifier-free guidance, the few-step
multistep sampler (one call per step, seeded draws independent of the batch), and the seeded starting noise."""

import pytest
import torch

from lit_videoalign.schedules.flow import euler_sample, sampling_sigmas
from lit_videoalign.schedules.samplers import (
    cfg_velocity,
    draw_noise,
    multistep_sample,
    next_sample,
    predicted_x0,
    seeded_noise,
)


def test_predicted_x0_by_hand_and_in_the_latents_dtype():
    x = torch.full((2, 1, 1, 1, 2), 1.0)
    v = torch.tensor([2.0, -2.0]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 2)
    assert torch.equal(predicted_x0(x, v, 0.25).flatten(1)[:, 0], torch.tensor([0.5, 1.5]))
    assert torch.equal(predicted_x0(x, v, torch.tensor([0.5, 1.0])).flatten(1)[:, 0], torch.tensor([0.0, 3.0]))
    assert torch.equal(predicted_x0(x, v, torch.tensor(0.25)), predicted_x0(x, v, 0.25))
    assert predicted_x0(x.bfloat16(), v.bfloat16(), torch.tensor([0.5, 1.0])).dtype == torch.bfloat16
    x0, n = torch.randn(3, 2, 2, 2, 2), torch.randn(3, 2, 2, 2, 2)  # the straight path points back to x0
    # float32 rounding on the scale of x0 and n: measured 8.6e-8 of max |x0| (torch 2.13.0 / 2.14.1, 3 seeds,
    # AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 100x that
    torch.testing.assert_close(predicted_x0(0.7 * x0 + 0.3 * n, n - x0, 0.3), x0, rtol=0,
                               atol=1e-5 * x0.abs().max().item())
    with pytest.raises(ValueError, match="same shape"):
        predicted_x0(x, v[:1], 0.5)
    with pytest.raises(ValueError, match="Tensor\\[B\\] with B=2"):
        predicted_x0(x, v, torch.tensor([0.1, 0.2, 0.3]))


def test_cfg_velocity_by_hand():
    v_c, v_u = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_velocity(v_c, v_u, 2.0), torch.tensor([5.0, 1.0]))  # 1 + 2 * (3 - 1)
    assert torch.equal(cfg_velocity(v_c, v_u, 1.0), v_c) and torch.equal(cfg_velocity(v_c, v_u, 0.0), v_u)
    with pytest.raises(ValueError, match="same shape"):
        cfg_velocity(v_c, v_u[:1], 2.0)


def test_next_sample_transitions_and_their_errors():
    x, x0, eps = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0])
    assert torch.equal(next_sample(x, x0, 0.5, 0.25, "renoise", eps), torch.tensor([0.5]))  # 0.75 * 0 + 0.25 * 2
    assert torch.equal(next_sample(x, x0, 0.5, 0.25, "euler"), torch.tensor([0.5]))  # 1 + (0.25 - 0.5) / 0.5 * 1
    with pytest.raises(ValueError, match="fresh noise"):
        next_sample(x, x0, 0.5, 0.25, "renoise")
    with pytest.raises(ValueError, match="sampler mode"):
        next_sample(x, x0, 0.5, 0.25, "ddim")


def test_multistep_sample_calls_once_per_step_and_its_seeded_draws_ignore_the_batch():
    calls = []

    def x0_fn(x, s):
        calls.append(s[0].item())
        return 0.5 * x

    noise = torch.randn(3, 2, 4)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    out = multistep_sample(x0_fn, noise, sigmas, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert calls == [1.0, 0.75, 0.5, 0.25]  # four steps, four calls
    alone = multistep_sample(x0_fn, noise[1:2], sigmas, [torch.Generator().manual_seed(2)])
    assert torch.equal(out[1:2], alone)  # sample 1 drew from its own generator only
    one = [multistep_sample(x0_fn, noise, sigmas, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(one[0], one[1])  # one generator for the batch: reproducible too
    with pytest.raises(ValueError, match="one per sample"):
        multistep_sample(x0_fn, noise, sigmas, [torch.Generator()])


def test_euler_transitions_of_a_flow_x0_are_the_euler_ode():
    velocity = lambda x, s: x - 0.3  # (x, sigma) -> v, any smooth field
    noise = torch.randn(2, 3, 4)
    sigmas = sampling_sigmas(4)
    x0_fn = lambda x, s: predicted_x0(x, velocity(x, s), s)
    expected = euler_sample(velocity, noise, sigmas)
    # the same four steps through x0 and back: measured up to 8.1e-8 of the largest value (torch 2.13.0 / 2.14.1,
    # 4 seeds, 1-4 threads, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 120x that
    torch.testing.assert_close(multistep_sample(x0_fn, noise, sigmas, mode="euler"), expected, rtol=0,
                               atol=1e-5 * expected.abs().max().item())


def test_seeded_noise_is_the_seeds_noise_and_its_generators_continue():
    noise, generators = seeded_noise((2, 3), [5, 9])
    for row, seed, g in zip(noise, (5, 9), generators):
        fresh = torch.Generator().manual_seed(seed)
        assert torch.equal(row, torch.randn((2, 3), generator=fresh))
        assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=fresh))  # same place in the stream
    like = torch.empty(2, 3)
    assert torch.equal(draw_noise(like, torch.Generator().manual_seed(1)),
                       torch.randn((2, 3), generator=torch.Generator().manual_seed(1)))
