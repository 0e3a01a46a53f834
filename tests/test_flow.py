"""Flow-matching maths against hand-computed values.

Where a check keeps allclose's default tolerance (rtol 1e-5), it stands for float32 rounding only: those checks
measured exact, or within 2.5e-7 relative, on torch 2.13.0 and 2.14.1.
"""

import math

import pytest
import torch

from lit_videoalign.schedules.flow import (
    add_noise,
    euler_sample,
    euler_step,
    sample_training_sigmas,
    sampling_sigmas,
    sde_step_with_logprob,
    shift_sigmas,
    velocity_target,
)


def test_add_noise_and_velocity_target_by_hand():
    x0 = torch.tensor([[2.0, -1.0], [0.0, 4.0]])
    noise = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    sigma = torch.tensor([0.25, 0.5])
    # row 0: 0.75 * x0 + 0.25 * noise; row 1: 0.5 * x0 + 0.5 * noise
    assert torch.allclose(add_noise(x0, noise, sigma), torch.tensor([[1.5, -0.5], [1.0, 2.0]]))
    assert torch.allclose(add_noise(x0, noise, 1.0), noise)
    assert torch.allclose(velocity_target(x0, noise), torch.tensor([[-2.0, 2.0], [2.0, -4.0]]))


def test_add_noise_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        add_noise(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="Tensor\\[B\\]"):
        add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.1, 0.2, 0.3]))


def test_sampling_sigmas_grid_and_shift():
    assert torch.allclose(sampling_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = sampling_sigmas(2, shift=3.0)
    # 3 * 0.5 / (1 + 2 * 0.5) = 0.75; endpoints are fixed
    assert torch.allclose(shifted, torch.tensor([1.0, 0.75, 0.0]))
    assert torch.allclose(shift_sigmas(torch.tensor([0.25]), 2.0), torch.tensor([0.4]))
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(0)


def test_training_sigmas_modes_are_seeded_and_in_range():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_training_sigmas(1000, mode="logit_normal", generator=g1)
    b = sample_training_sigmas(1000, mode="logit_normal", generator=g2)
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1
    assert abs(float(a.median()) - 0.5) < 0.05  # logit-normal(0, 1) is centred at 0.5; 0.05 is 5 standard errors
    u = sample_training_sigmas(4000, mode="uniform", generator=torch.Generator().manual_seed(0))
    assert abs(float(u.mean()) - 0.5) < 0.02  # 4.4 standard errors (0.29 / sqrt(4000))
    shifted = sample_training_sigmas(4000, mode="uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_sigmas(u, 3.0))
    assert shifted.mean() > u.mean()  # a shift > 1 moves mass towards noise
    with pytest.raises(ValueError, match="unknown sigma sampling mode 'cosine'"):
        sample_training_sigmas(4, mode="cosine")


def test_euler_step_by_hand():
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    assert torch.allclose(euler_step(x, v, 0.5, 0.25), torch.tensor([[0.5]]))
    out = euler_step(torch.ones(2, 1), torch.ones(2, 1), torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0]))
    assert torch.allclose(out, torch.tensor([[0.5], [0.5]]))


def test_euler_sample_lands_on_the_data_point_of_a_delta_distribution():
    # For data concentrated at x0 the exact velocity is (x - x0) / sigma, and the straight path is hit exactly.
    x0 = torch.tensor([[3.0, -2.0]])
    noise = torch.tensor([[0.5, 0.7]])
    out = euler_sample(lambda x, s: (x - x0) / s.view(-1, 1), noise, sampling_sigmas(7))
    # measured exact (error 0, torch 2.13.0 / 2.14.1); seven float32 steps may round by a few ulp (8e-8 of |x0| each)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5 * x0.abs().max().item())


def test_sde_step_mean_std_logprob_by_hand():
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    prev = torch.tensor([[0.5]])
    sample, log_prob, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, noise_level=0.7, prev_sample=prev)
    # std_t = 0.7 * sqrt(0.5 / 0.5) = 0.7; dt = -0.25
    # mean = 1 * (1 + 0.49 / 1 * -0.25) + 2 * (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 - 0.6225 = 0.255
    # float32 against float64 hand values: measured rel err <= 2.0e-7 (torch 2.13.0 / 2.14.1); rtol 1e-5 is 50x that
    assert torch.allclose(mean, torch.tensor([[0.255]]), rtol=1e-5, atol=0)
    assert torch.allclose(std.reshape(()), torch.tensor(0.35), rtol=1e-5, atol=0)  # 0.7 * sqrt(0.25)
    expected = -(0.245**2) / (2 * 0.35**2) - math.log(0.35) - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(log_prob, torch.tensor([expected]), rtol=1e-5, atol=0)
    assert torch.equal(sample, prev)
    assert log_prob.dtype == torch.float32


def test_sde_first_step_from_pure_noise_is_finite_and_by_hand():
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    _, log_prob, mean, std = sde_step_with_logprob(x, v, 1.0, 0.9, noise_level=0.7,
                                                   prev_sample=torch.tensor([[0.555]]))
    # sigma == 1 uses sigma_next in the std: std_t = 0.7 * sqrt(1 / 0.1); std = std_t * sqrt(0.1) = 0.7
    # mean = x * (1 - std_t^2 / 2 * 0.1) + v * (1 + 0) * -0.1 = 0.755 - 0.2 = 0.555
    # measured rel err <= 1.1e-7 (torch 2.13.0 / 2.14.1); rtol 1e-5 is 90x that
    assert torch.allclose(mean, torch.tensor([[0.555]]), rtol=1e-5, atol=0)
    assert torch.allclose(std.reshape(()), torch.tensor(0.7), rtol=1e-5, atol=0)
    expected = -math.log(0.7) - 0.5 * math.log(2 * math.pi)  # sample at the mean
    assert torch.allclose(log_prob, torch.tensor([expected]), rtol=1e-5, atol=0)


def test_sde_logprob_is_averaged_and_recomputes_exactly():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.0])
    sample, log_prob, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, generator=g)
    assert log_prob.shape == (3,) and torch.isfinite(log_prob).all()
    _, again, _, _ = sde_step_with_logprob(x, v, sigma, sigma_next, prev_sample=sample)
    # measured bit-identical (error 0, torch 2.13.0 / 2.14.1); 1e-6 of the largest value is ~8 ulp
    torch.testing.assert_close(again, log_prob, rtol=0, atol=1e-6 * log_prob.abs().max().item())
    # averaged, not summed: the per-element density of a standard-normal draw is about -1.42 nats
    z = (sample - mean) / std
    assert torch.allclose(log_prob, (-0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3, 4)))
    # a sample far from the mean is less likely
    _, worse, _, _ = sde_step_with_logprob(x, v, sigma, sigma_next, prev_sample=mean + 5 * std)
    assert (worse < log_prob).all()


def test_sde_step_gradient_flows_through_mean_only():
    x = torch.randn(2, 3)
    v = torch.randn(2, 3, requires_grad=True)
    sample, log_prob, _, _ = sde_step_with_logprob(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(1))
    log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_sde_step_rejects_increasing_sigma():
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(torch.zeros(1, 2), torch.zeros(1, 2), 0.3, 0.5)
