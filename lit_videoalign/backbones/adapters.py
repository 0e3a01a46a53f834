"""Several roles over one denoiser: named peft LoRA adapters, switching between them, weight EMA, guided velocity.

Distillation keeps a student, a teacher, a critic (fake score) or an EMA target side by side. With LoRA they are
named adapters over one frozen base (:func:`add_named_adapter`, :class:`AdapterRoles`), and the teacher is the base
with every adapter off, so the roles cost one set of base weights. :func:`checkpointing_off` keeps a role's
activations when its backward runs after another adapter is active again; :func:`ema_update` moves a target's weights
towards the online ones; :func:`guided_velocity` is one role's velocity with classifier-free guidance.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.schedules.samplers import cfg_velocity


class AdapterRoles:
    """Several peft adapters over one frozen base, one active at a time, or none (the base alone).

    peft's ``set_adapter`` and ``enable_adapters`` rewrite ``requires_grad`` of every adapter (active ones True,
    others False); after every switch this puts back the flags given here, so an optimizer's parameters stay
    trainable and an EMA adapter stays frozen whichever adapter runs. The ``default`` adapter is active outside
    :meth:`use`, which is what ``generate`` and the pipeline export (which merges the active adapter) see.

    With gradient checkpointing, blocks are recomputed in the backward pass with whatever adapter is active *then*:
    run the backward of a loss inside the same :meth:`use` as its forward (contexts nest).

    Args:
        denoiser: a diffusers model with peft adapters.
        trainable: adapter name -> whether its weights train.
        default: the adapter active outside :meth:`use`.
    """

    def __init__(self, denoiser: nn.Module, trainable: dict[str, bool], default: str) -> None:
        if default not in trainable:
            raise ValueError(f"default adapter {default!r} is not one of {sorted(trainable)}")
        self.denoiser, self.trainable, self.default = denoiser, dict(trainable), default
        self.active: str | None = default
        self.activate(default)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The weights of adapter ``name``."""
        if name not in self.trainable:
            raise ValueError(f"unknown adapter {name!r}; expected one of {sorted(self.trainable)}")
        return [p for n, p in self.denoiser.named_parameters() if f".{name}." in n and "lora_" in n]

    def _restore_flags(self) -> None:
        for name, train in self.trainable.items():
            for p in self.parameters(name):
                p.requires_grad_(train)

    def activate(self, name: str | None) -> None:
        """Make adapter ``name`` the only active one (None: run the base with every adapter off)."""
        if name is None:
            self.denoiser.disable_adapters()
        else:
            if name not in self.trainable:
                raise ValueError(f"unknown adapter {name!r}; expected one of {sorted(self.trainable)}")
            self.denoiser.enable_adapters()
            self.denoiser.set_adapter(name)
        self.active = name
        self._restore_flags()

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Context in which adapter ``name`` (None: no adapter) runs; the previously active one is restored after."""
        previous = self.active
        if name != previous:
            self.activate(name)
        try:
            yield
        finally:
            if self.active != previous:
                self.activate(previous)


@contextmanager
def checkpointing_off(module: nn.Module) -> Iterator[None]:
    """Context in which ``module``'s blocks keep their activations instead of recomputing them in the backward pass
    (diffusers' ``gradient_checkpointing`` flags, restored after).

    For a forward under one adapter whose backward runs once another adapter is active again: a checkpointed block
    would be recomputed with the adapter active *then*, and the gradient would be the wrong network's.
    """
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def add_named_adapter(backbone, name: str, rank: int, alpha: float | None, target_modules: list[str] | None) -> None:
    """Add one more peft LoRA adapter ``name`` to ``backbone.denoiser`` (peft warns about a second adapter; that is
    the point here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        backbone.add_lora(rank, alpha, target_modules, adapter_name=name)


@torch.no_grad()
def ema_update(target: Iterable[Tensor], online: Iterable[Tensor], decay: float) -> None:
    """In place, ``target = decay * target + (1 - decay) * online`` for every pair of tensors."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA target has {len(target)} tensors but the online model {len(online)}")
    for t, o in zip(target, online):
        if t.shape != o.shape:
            raise ValueError(f"EMA tensor shapes differ: {tuple(t.shape)} vs {tuple(o.shape)}")
        t.lerp_(o.to(t.dtype), 1.0 - decay)


def guided_velocity(backbone, x: Tensor, sigma: Tensor, cond: Conditioning, uncond: Conditioning | None,
                    guidance_scale: float, denoiser: nn.Module | None = None) -> Tensor:
    """A role's velocity with classifier-free guidance, ``v_u + g * (v_c - v_u)`` in one batched call (just ``v_c``
    when ``g = 1``); ``denoiser`` runs instead of the backbone's own when given (a frozen teacher copy, a critic)."""
    if guidance_scale == 1.0:
        return backbone.predict_velocity(x, sigma, cond, denoiser=denoiser)
    if uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional (negative-prompt) conditioning")
    both = Conditioning.cat([cond, uncond])
    v_c, v_u = backbone.predict_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both,
                                         denoiser=denoiser).chunk(2)
    return cfg_velocity(v_c, v_u, guidance_scale)
