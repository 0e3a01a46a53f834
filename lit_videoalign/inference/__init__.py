"""Inference-time alignment: steer a trained model's samples with a reward, without changing its weights.

Best-of-N, reward-gradient guidance on the predicted clean sample, and search over initial noises; every function
takes an :class:`~lit_videoalign.objectives.base.AlignmentModule` and a ``reward_zoo`` reward and returns an
:class:`InferenceResult` (videos ``[B, T, C, H, W]`` in ``[0, 1]``, scores, denoiser evaluations spent).
"""

from lit_videoalign.inference.base import InferenceResult, require_differentiable, sample_from_noise
from lit_videoalign.inference.best_of_n import best_of_n
from lit_videoalign.inference.noise_search import noise_search
from lit_videoalign.inference.reward_guidance import reward_guided_sample

__all__ = ["InferenceResult", "best_of_n", "noise_search", "require_differentiable", "reward_guided_sample",
           "sample_from_noise"]
