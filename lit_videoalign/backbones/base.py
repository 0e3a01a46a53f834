"""The backbone contract every objective talks to: prompts in, latents in and out, velocity predictions.

A backbone hides one model family's quirks (tokenisation, VAE normalisation, diffusers timesteps, latent packing)
behind the project's conventions, so objectives are written once for every family.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Conditioning:
    """What the denoiser is conditioned on. Every tensor has the batch dimension first.

    ``images`` are conditioning images (first frames or references) ``(b, c, h, w)`` in ``[0, 1]``; the backbone's
    encodings of them (:meth:`VideoBackbone.encode_images`) live in ``extra`` under keys starting with ``image_``, so
    they batch, repeat and concatenate with the prompt and go with the images when the prompt is swapped
    (:meth:`with_images_from`, the unconditional branch of guidance keeps the image).
    """

    prompt_embeds: Tensor  # (b, l, d)
    prompt_mask: Tensor | None = None  # (b, l), 1 for real tokens
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. reference-image latents for I2V
    images: Tensor | None = None  # (b, c, h, w) in [0, 1]: first frames or references

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        mask = fn(self.prompt_mask) if self.prompt_mask is not None else None
        images = fn(self.images) if self.images is not None else None
        return Conditioning(fn(self.prompt_embeds), mask, {k: fn(v) for k, v in self.extra.items()}, images)

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each sample ``repeats`` times in a row (for groups of rollouts per prompt)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def index(self, idx: Tensor | slice) -> Conditioning:
        """A sub-batch."""
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(conds: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch (e.g. conditional and unconditional for classifier-free guidance)."""
        first = conds[0]
        masks = [c.prompt_mask for c in conds]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ValueError("cannot concatenate conditionings where only some have a prompt_mask")
        if any(c.images is None for c in conds) and not all(c.images is None for c in conds):
            raise ValueError("cannot concatenate conditionings where only some have conditioning images; give the "
                             "others the same images (Conditioning.with_images_from)")
        keys = [sorted(c.extra) for c in conds]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"cannot concatenate conditionings with different extra keys: {keys}")
        return Conditioning(
            torch.cat([c.prompt_embeds for c in conds]),
            torch.cat(masks) if masks[0] is not None else None,
            {k: torch.cat([c.extra[k] for c in conds]) for k in first.extra},
            torch.cat([c.images for c in conds]) if first.images is not None else None,
        )

    def with_images_from(self, other: Conditioning) -> Conditioning:
        """This prompt conditioning with ``other``'s images and their encodings (``extra["image_*"]``), e.g. the
        negative prompt's for the unconditional branch of guidance, which keeps the image as the I2V pipelines do."""
        if len(other) != len(self):
            raise ValueError(f"cannot take the images of a conditioning of batch {len(other)} for batch {len(self)}")
        extra = {k: v for k, v in self.extra.items() if not k.startswith("image_")}
        extra.update({k: v for k, v in other.extra.items() if k.startswith("image_")})
        return Conditioning(self.prompt_embeds, self.prompt_mask, extra, other.images)

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))


class VideoBackbone(nn.Module):
    """A text-to-video flow model seen through the project's conventions.

    Subclasses set ``denoiser`` (the trainable transformer; LoRA attaches here) and implement the five methods
    below. LoRA and the reference-model switch are shared here and go through peft via diffusers'
    ``PeftAdapterMixin`` (``add_adapter`` / ``disable_adapters`` / ``enable_adapters``).

    Conventions: pixel videos are ``[B, T, C, H, W]`` float in ``[0, 1]``; latents are ``[B, C, T', H', W']``;
    ``sigma`` is a float or ``Tensor[B]`` in ``[0, 1]``.
    """

    denoiser: nn.Module
    # Default LoRA targets; families override (the attention projections of diffusers' attention modules).
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # Sigma shift of the sampling grid the model was trained for (diffusers keeps it in the scheduler config).
    default_sampling_shift: float = 1.0
    # The pipeline's own diffusers scheduler (``sampler="pipeline"`` samples with it); None: only the Euler ODE.
    scheduler = None
    # Frame rate of the videos the model generates (frames per second), passed to rewards that sample by time; None
    # when unknown.
    fps: float | None = None

    # -- capabilities (diffusers-style class attributes; subclasses override them, as attributes or properties) ----
    # Callers read these directly (``backbone.pixel_space``), never with a ``getattr(..., default)`` probe.
    pixel_space: bool = False  # latents are the pixels themselves (no VAE): decoding is free
    is_quantized: bool = False  # the denoiser's base weights are quantized (4-bit): only LoRA can train on it
    compile_blocks: bool = False  # ``torch.compile`` the transformer blocks when training starts
    supports_images: bool = False  # accepts conditioning images (image-to-video, reference frames)
    supports_context_parallel: bool = False  # can split a video's tokens across devices
    supports_causal: bool = False  # can denoise chunk by chunk with a causal (KV-cached) attention mask

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_videos(self, videos: Tensor) -> Tensor:
        """Pixel ``[B, T, C, H, W]`` in ``[0, 1]`` -> latents ``[B, C, T', H', W']``."""
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, T', H', W']`` -> pixel ``[B, T, C, H, W]`` in ``[0, 1]``."""
        raise NotImplementedError

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(C, T', H', W')`` of one video's latents."""
        raise NotImplementedError

    def predict_velocity(self, latents: Tensor, sigma: float | Tensor, cond: Conditioning) -> Tensor:
        raise NotImplementedError

    def encode_images(self, images: Tensor, cond: Conditioning, *, num_frames: int,
                      last_images: Tensor | None = None) -> Conditioning:
        """``cond`` conditioned also on ``images`` ``(b, 3, h, w)`` in ``[0, 1]`` (the first frames of videos of
        ``num_frames`` frames at ``h x w``, or references) and, where the model takes them, ``last_images`` (the last
        frames): the images are encoded once here and kept in ``Conditioning.images`` and ``extra["image_*"]``, which
        :meth:`predict_velocity` applies. Only backbones with ``supports_images`` implement it."""
        raise ValueError(f"{type(self).__name__} is text-to-video only; it cannot be conditioned on images (load an "
                         "image-to-video model, e.g. a WanImageToVideoPipeline folder)")

    def set_timesteps_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        """Arguments of ``scheduler.set_timesteps`` besides ``num_steps`` that the model's pipeline passes (custom
        sigmas, a resolution-dependent ``mu``), for latents ``(c, t, h, w)``; none by default."""
        return {}

    # -- LoRA ---------------------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "_hf_peft_config_loaded", False))

    def add_lora(
        self,
        rank: int,
        alpha: float | None = None,
        target_modules: list[str] | tuple[str, ...] | None = None,
        adapter_name: str = "default",
    ) -> None:
        """Attach a peft LoRA adapter to the denoiser and freeze its base weights.

        Args:
            rank: LoRA rank ``r``.
            alpha: LoRA alpha (scale ``alpha / r``); defaults to ``rank`` (scale 1).
            target_modules: module names to adapt; defaults to ``default_lora_targets``.
            adapter_name: peft adapter name (several adapters may coexist, e.g. student and critic).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        if not hasattr(self.denoiser, "add_adapter"):
            raise TypeError(f"{type(self.denoiser).__name__} does not support peft adapters (no add_adapter)")
        targets = list(target_modules) if target_modules is not None else list(self.default_lora_targets)
        names = {name.rsplit(".", 1)[-1] for name, _ in self.denoiser.named_modules()} | {
            name for name, _ in self.denoiser.named_modules()
        }
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(f"LoRA target modules {missing} not found in {type(self.denoiser).__name__}")
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                            init_lora_weights=True)
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(config, adapter_name=adapter_name)
        for name, param in self.denoiser.named_parameters():
            param.requires_grad_(f"lora_A.{adapter_name}." in name or f"lora_B.{adapter_name}." in name)

    @contextmanager
    def _adapters_off(self) -> Iterator[None]:
        if not self.has_lora:
            raise RuntimeError("adapters_disabled() needs a LoRA adapter; call add_lora first")
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def adapters_disabled(self) -> AbstractContextManager[None]:
        """Context in which the denoiser runs with its base weights only (the reference model under LoRA)."""
        return self._adapters_off()

    # -- structure -----------------------------------------------------------------------------------------------
    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """The transformer block classes (FSDP wrap and activation-checkpointing units), from ``_no_split_modules``."""
        names = set(getattr(self.denoiser, "_no_split_modules", None) or ())
        found = {type(m) for m in self.denoiser.modules() if type(m).__name__ in names}
        return tuple(sorted(found, key=lambda c: c.__name__))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def training_sigma_range(self) -> tuple[float, float]:
        """The sigmas training draws from: all of ``[0, 1]`` unless part of the denoiser is frozen for part of the
        range (Wan 2.2 A14B training one expert)."""
        return (0.0, 1.0)

    def guidance_at(self, sigma: Tensor, guidance_scale: float) -> float | Tensor:
        """The classifier-free guidance scale at each sample's ``sigma``: ``guidance_scale`` everywhere by default
        (Wan 2.2 A14B may give its low-noise expert its own, ``guidance_scale_2``)."""
        return guidance_scale

    def trains_at(self, sigma: Tensor) -> Tensor:
        """Whether a trained part of the denoiser runs at each ``sigma`` (bool, its shape): all of them by default."""
        return torch.ones_like(sigma, dtype=torch.bool)

    def parameter_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """``params`` as optimizer groups (one per expert for Wan 2.2 A14B); one group by default."""
        return [{"params": list(params)}]
