"""Wan 2.2 A14B's two experts as one denoiser: the high-noise transformer for timesteps at or above the boundary, the
low-noise one below it, as ``WanPipeline`` switches them; each can train on its own.

The pipeline keeps them as ``transformer`` (high noise) and ``transformer_2`` (low noise) and switches at
``boundary_ratio * num_train_timesteps`` (0.875 for T2V, 0.9 for I2V): ``t >= boundary`` runs ``transformer``. Here
they are the submodules ``high_noise`` and ``low_noise`` of :class:`TwoExpertDenoiser`, which dispatches each sample
of a batch to the expert of its timestep, so samplers, rollouts and every objective see one denoiser. Training
targets ``trained`` experts only (the others are frozen and get no LoRA); each trained expert carries its own peft
adapter and its own optimizer group, and training sigmas are drawn from the trained experts' range
(:attr:`TwoExpertDenoiser.sigma_range`). Checkpoints keep them apart by name (``high_noise.*``, ``low_noise.*``) and
exports write them back as ``transformer/`` and ``transformer_2/``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Expert name -> the pipeline's component that holds it.
EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}
# Config entries that must agree for the two experts to take the same inputs.
_SHARED_CONFIG = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim", "pos_embed_seq_len",
                  "added_kv_proj_dim")


def check_experts(names: Iterable[str], what: str = "train_experts") -> tuple[str, ...]:
    """``names`` as a tuple of known expert names, in pipeline order; an unknown or repeated name is refused."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in EXPERTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"{what} must name some of the pipeline's experts {list(EXPERTS)} once each, got {names}")
    return tuple(n for n in EXPERTS if n in names)


class TwoExpertDenoiser(nn.Module):
    """Two transformers of one architecture switched at a boundary timestep (Wan 2.2 A14B's mixture of experts).

    Args:
        high_noise: the pipeline's ``transformer``, for timesteps ``>= boundary_ratio * num_train_timesteps``.
        low_noise: the pipeline's ``transformer_2``, below it.
        boundary_ratio: the pipeline config's ``boundary_ratio``, in ``(0, 1)``.
        trained: the experts that train; the others are frozen and never get an adapter.
        num_train_timesteps: the scheduler's (1000: ``timestep = sigma * 1000``).
    """

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary_ratio: float,
                 trained: Iterable[str] = tuple(EXPERTS), num_train_timesteps: int = 1000) -> None:
        super().__init__()
        if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, (int, float)) \
                or not 0 < boundary_ratio < 1:
            raise ValueError(f"boundary_ratio must be a number in (0, 1), got {boundary_ratio!r}")
        differ = [k for k in _SHARED_CONFIG
                  if _as_tuple(high_noise.config.get(k)) != _as_tuple(low_noise.config.get(k))]
        if type(high_noise) is not type(low_noise) or differ:
            raise ValueError(f"the two experts must share one architecture; {type(high_noise).__name__} and "
                             f"{type(low_noise).__name__} differ in {differ or ['class']}")
        self.high_noise, self.low_noise = high_noise, low_noise
        self.boundary_ratio, self.num_train_timesteps = float(boundary_ratio), num_train_timesteps
        self.trained = check_experts(trained)
        for name in EXPERTS:
            if name not in self.trained:
                self.expert(name).requires_grad_(False)
        # What FSDP wrapping, checkpointing and compilation look up on a diffusers model.
        self._no_split_modules = getattr(high_noise, "_no_split_modules", None)
        self._repeated_blocks = getattr(high_noise, "_repeated_blocks", None)

    # -- what callers read off a diffusers model -------------------------------------------------------------------
    @property
    def config(self):
        return self.high_noise.config

    @property
    def dtype(self) -> torch.dtype:
        return self.high_noise.dtype

    def expert(self, name: str) -> nn.Module:
        check_experts([name], "expert")
        return getattr(self, name)

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The sigmas the trained experts run at: ``[boundary_ratio, 1]`` for the high-noise expert alone,
        ``[0, boundary_ratio]`` for the low-noise one, ``[0, 1]`` for both."""
        low = 0.0 if "low_noise" in self.trained else self.boundary_ratio
        high = 1.0 if "high_noise" in self.trained else self.boundary_ratio
        return low, high

    def high_noise_at(self, timestep: Tensor) -> Tensor:
        """Whether the high-noise expert runs at each ``timestep`` (bool, its shape): ``t >= boundary``."""
        return timestep >= self.boundary_timestep

    def trains_at(self, timestep: Tensor) -> Tensor:
        """Whether a trained expert runs at each ``timestep`` (bool, its shape)."""
        high = self.high_noise_at(timestep)
        return torch.where(high, "high_noise" in self.trained, "low_noise" in self.trained)

    def enable_gradient_checkpointing(self) -> None:
        for name in EXPERTS:
            self.expert(name).enable_gradient_checkpointing()

    # -- the forward ------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, timestep: Tensor, **kwargs):
        """Each sample runs through the expert of its ``timestep`` ``(b,)``; the other arguments are those of the
        experts (batch-first tensors are split with the samples)."""
        if timestep.ndim != 1 or timestep.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"the two-expert denoiser picks an expert per sample and needs one timestep per sample "
                             f"({hidden_states.shape[0]},), got shape {tuple(timestep.shape)}")
        high = self.high_noise_at(timestep)  # (b,), as WanPipeline: t >= boundary runs the high-noise expert
        if bool(high.all()) or not bool(high.any()):
            expert = self.high_noise if bool(high.all()) else self.low_noise
            return expert(hidden_states=hidden_states, timestep=timestep, **kwargs)
        b, outputs, order = hidden_states.shape[0], [], []
        for mask, expert in ((high, self.high_noise), (~high, self.low_noise)):
            index = mask.nonzero().squeeze(1)
            part = {k: v[index] if isinstance(v, Tensor) and v.ndim and v.shape[0] == b else v
                    for k, v in kwargs.items()}
            out = expert(hidden_states=hidden_states[index], timestep=timestep[index], **part)
            outputs.append(out[0] if isinstance(out, tuple) else out.sample)
            order.append(index)
        merged = torch.cat(outputs)[torch.argsort(torch.cat(order))]  # back in the batch's order
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=merged)
        return (merged,)

    # -- peft adapters: one per trained expert, through each expert's own diffusers PeftAdapterMixin ----------------
    def _adapted(self) -> list[nn.Module]:
        return [self.expert(n) for n in self.trained if getattr(self.expert(n), "_hf_peft_config_loaded", False)]

    @property
    def _hf_peft_config_loaded(self) -> bool:
        return bool(self._adapted())

    @property
    def peft_config(self) -> dict:
        adapted = self._adapted()
        return dict(adapted[0].peft_config) if adapted else {}

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """One adapter of this config on each trained expert (separate weights); frozen experts get none."""
        import copy

        for name in self.trained:
            self.expert(name).add_adapter(copy.deepcopy(adapter_config), adapter_name=adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        for expert in self._adapted():
            expert.set_adapter(adapter_name)

    def enable_adapters(self) -> None:
        for expert in self._adapted():
            expert.enable_adapters()

    def disable_adapters(self) -> None:
        for expert in self._adapted():
            expert.disable_adapters()

    def fuse_lora(self, *args, **kwargs) -> None:
        for expert in self._adapted():
            expert.fuse_lora(*args, **kwargs)

    def unload_lora(self) -> None:
        for expert in self._adapted():
            expert.unload_lora()

    def parameter_groups(self, params: Iterable[nn.Parameter]) -> list[dict]:
        """``params`` split into one optimizer group per trained expert, named after it (``{"params", "name"}``),
        and one ``"other"`` group for parameters outside the experts (a GAN head); a parameter of a frozen expert is
        refused."""
        owner = {id(p): name for name in EXPERTS for p in self.expert(name).parameters()}
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in (*self.trained, "other")}
        for p in params:
            name = owner.get(id(p), "other")
            if name not in groups:
                raise ValueError(f"a trainable parameter of shape {tuple(p.shape)} belongs to the frozen {name} "
                                 f"expert; only {list(self.trained)} train")
            groups[name].append(p)
        return [{"params": ps, "name": name} for name, ps in groups.items() if ps]


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value
