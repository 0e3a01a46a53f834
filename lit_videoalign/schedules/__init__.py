"""Flow-matching maths and the pure samplers: no Lightning, no models (``flow.py``: noise, targets, sigmas, ODE/SDE
steps; ``samplers.py``: predicted x0, guidance, few-step and scheduler sampling). Names load lazily.
"""

from lit_videoalign._exports import lazy_exports

_EXPORTS = {
    "add_noise": "lit_videoalign.schedules.flow",
    "velocity_target": "lit_videoalign.schedules.flow",
    "sample_training_sigmas": "lit_videoalign.schedules.flow",
    "sampling_sigmas": "lit_videoalign.schedules.flow",
    "euler_step": "lit_videoalign.schedules.flow",
    "sde_step_with_logprob": "lit_videoalign.schedules.flow",
    "euler_sample": "lit_videoalign.schedules.flow",
    "predicted_x0": "lit_videoalign.schedules.samplers",
    "cfg_velocity": "lit_videoalign.schedules.samplers",
    "multistep_sample": "lit_videoalign.schedules.samplers",
    "scheduler_sample": "lit_videoalign.schedules.samplers",
    "seeded_noise": "lit_videoalign.schedules.samplers",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
