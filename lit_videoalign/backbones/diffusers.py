"""Diffusers video pipelines as backbones: Wan 2.1/2.2, LTX-Video, HunyuanVideo; a family is one entry in ``FAMILIES``.

Loading goes through the real ``from_pretrained`` of diffusers and transformers, component by component, from a
diffusers pipeline folder or Hub id (``model_index.json`` plus ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, for HunyuanVideo ``text_encoder_2/``, ``tokenizer_2/``, and for Wan 2.1 I2V ``image_encoder/``,
``image_processor/``). Only classes from diffusers and transformers are ever instantiated, weights are read from
safetensors, and no remote code runs (the finding and loading helpers are in :mod:`lit_videoalign.backbones.loading`).

Each family reproduces its diffusers pipeline: how prompts are encoded, how VAE latents are normalised, and how the
transformer is called. All three pipelines sample with ``FlowMatchEulerDiscreteScheduler``, whose deterministic step is
``prev_sample = sample + (sigma_next - sigma) * model_output`` at ``timestep = sigma * num_train_timesteps`` (1000): the
transformer's output *is* the velocity ``noise - x0`` of the project's convention, at timestep ``sigma * 1000`` (the
tests check one pipeline step against :meth:`DiffusersVideoBackbone.predict_velocity` for every family).

A pipeline whose ``model_index.json`` has no VAE (``"vae": [null, null]``) is a **pixel-space** model: latents are
the video itself rescaled to ``[-1, 1]`` as ``[B, C, T, H, W]``. The shipped toy-world base is one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone
from lit_videoalign.backbones.experts import EXPERTS, TwoExpertDenoiser, check_experts
from lit_videoalign.backbones.families import (  # noqa: F401  (re-exported: their old home was this module)
    FAMILIES,
    HunyuanVideoFamily,
    LTXFamily,
    ModelFamily,
    WanFamily,
    family_for,
    pack_latents,
    unpack_latents,
)
from lit_videoalign.backbones.loading import (  # noqa: F401  (re-exported: their old home was this module)
    _DTYPES,
    _QUANTIZATIONS,
    ALLOWED_LIBRARIES,
    BUILTIN_DIR,
    BUILTIN_PREFIX,
    _component_class,
    _load_quantized,
    _scheduler_shift,
    component_classes,
    image_processor_name,
    load_image_encoder,
    load_scheduler,
    resolve_pretrained_path,
)
from lit_videoalign.errors import shorten
from lit_videoalign.schedules.flow import _broadcast
from lit_videoalign.video_io import atomic_dir, check_video

if TYPE_CHECKING:
    pass



def _check_images(images: Tensor, name: str, batch: int) -> None:
    """Refuse anything but a float RGB batch ``(batch, 3, h, w)`` in ``[0, 1]``."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a Tensor [B, C, H, W] in [0, 1], got {what}")
    if images.shape[1] != 3:
        kind = {1: "grayscale", 2: "grayscale with alpha", 4: "RGBA"}.get(images.shape[1], f"{images.shape[1]}-channel")
        raise ValueError(f"{name} must be RGB (3 channels), got {kind} images of shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {images.dtype}")
    if images.shape[0] != batch:
        raise ValueError(f"{name} has {images.shape[0]} images for a conditioning batch of {batch}; expected one each")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{name} must be in [0, 1], got values in [{low:.3g}, {high:.3g}]")


# Frame rate of the builtin pipelines' videos (the toy world is rendered and exported at 8 fps).
BUILTIN_FPS = {"toyworld-base": 8.0, "toyworld-i2v": 8.0}


class DiffusersVideoBackbone(VideoBackbone):
    """A diffusers text-to-video pipeline (Wan, LTX-Video, HunyuanVideo) or Wan 2.1 image-to-video pipeline
    (``WanImageToVideoPipeline``: :meth:`encode_images`) as a :class:`VideoBackbone`.

    The family is recognised from the transformer class in ``model_index.json``. Everything but the denoiser is frozen
    and kept in eval mode.

    Args:
        pretrained_model_name_or_path: a pipeline folder, a Hub id (``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"``,
            ``"Lightricks/LTX-Video"``, ``"hunyuanvideo-community/HunyuanVideo"``) or ``"builtin:toyworld-base"`` for a
            pipeline shipped with this package.
        revision: Hub revision (branch, tag or commit) to pin.
        max_sequence_length: prompt length in tokens; defaults to the family's (Wan 512, LTX 128, Hunyuan 256).
        torch_dtype: dtype of the denoiser weights (``"float32"``, ``"bfloat16"``, ``"float16"``).
        frozen_dtype: dtype of the frozen VAE and text encoders.
        reinit_denoiser: re-initialise the denoiser from its config (pretraining from scratch); uses the global seed.
        gradient_checkpointing: recompute transformer blocks in the backward pass.
        family_options: family settings that are pipeline call arguments in diffusers, e.g. ``{"frame_rate": 24}``
            (LTX) or ``{"guidance_scale": 1.0, "prompt_template": {...}}`` (HunyuanVideo); see the family classes.
        quantization: ``"nf4"`` or ``"fp4"`` loads the denoiser's linear layers in 4 bits through diffusers'
            ``BitsAndBytesConfig`` (computing in ``torch_dtype``) as the frozen base of a LoRA adapter (QLoRA,
            arXiv 2305.14314); None loads full weights. Needs bitsandbytes; diffusers loads it on an accelerator.
        compile_blocks: ``torch.compile`` the transformer blocks when training starts (in ``configure_model``, after
            any sharding).
        fps: frame rate of the generated videos, passed to rewards that sample frames by time; defaults to the
            builtin pipeline's (toy world 8) or the family's (Wan 16, LTX its ``frame_rate``, HunyuanVideo 24).
        strict_prompts: refuse prompts longer than ``max_sequence_length`` tokens; by default they are truncated as
            the pipeline does, with one warning per backbone giving the count.
        train_experts: for a two-expert pipeline (Wan 2.2 A14B), the experts that train: ``["high_noise"]``,
            ``["low_noise"]`` or both (None, the default); the others stay frozen. Training sigmas are drawn from the
            trained experts' range (:attr:`training_sigma_range`); see :mod:`lit_videoalign.backbones.experts`.
        expert_lr: a learning rate per trained expert, e.g. ``{"low_noise": 5e-5}``, for its optimizer group; the
            others take the optimizer's.
        guidance_scale_2: for a two-expert pipeline, the guidance scale of the low-noise expert's steps (the
            pipeline's ``guidance_scale_2``); None uses the one guidance scale for both, as diffusers does.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        max_sequence_length: int | None = None,
        torch_dtype: str = "float32",
        frozen_dtype: str = "float32",
        reinit_denoiser: bool = False,
        gradient_checkpointing: bool = False,
        family_options: dict[str, Any] | None = None,
        quantization: str | None = None,
        compile_blocks: bool = False,
        strict_prompts: bool = False,
        fps: float | None = None,
        train_experts: list[str] | None = None,
        expert_lr: dict[str, float] | None = None,
        guidance_scale_2: float | None = None,
    ) -> None:
        super().__init__()
        if quantization is not None and quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(_QUANTIZATIONS)} or None, got {quantization!r}")
        if quantization is not None and reinit_denoiser:
            raise ValueError("quantization needs pretrained weights to quantize; it cannot be combined with "
                             "reinit_denoiser=True")
        self.compile_blocks, self.strict_prompts, self._warned_truncation = compile_blocks, strict_prompts, False
        for key, value in (("torch_dtype", torch_dtype), ("frozen_dtype", frozen_dtype)):
            if value not in _DTYPES:
                raise ValueError(f"{key} must be one of {list(_DTYPES)}, got {value!r}")
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        root = resolve_pretrained_path(pretrained_model_name_or_path, revision)
        self._root = root
        index = json.loads((root / "model_index.json").read_text())
        self.model_index = index
        if not (index.get("transformer") or [None])[0]:
            raise ValueError(f"pipeline {root} lacks required components ['transformer'] in model_index.json")
        two_experts = bool((index.get("transformer_2") or [None])[0])
        if train_experts is not None and not two_experts:
            raise ValueError(f"train_experts={train_experts!r} names experts, but pipeline {root} has one transformer; "
                             "only a two-expert pipeline (Wan 2.2 A14B: transformer and transformer_2) has them")
        self.family = family_for(index["transformer"][1]).with_options(family_options)
        components = (*self.family.components, "transformer_2") if two_experts else self.family.components
        classes = component_classes(root, index, self.family.name, components)  # before loading any

        dtype, frozen = _DTYPES[torch_dtype], _DTYPES[frozen_dtype]

        def load_denoiser(subfolder: str) -> nn.Module:
            transformer_cls = classes[subfolder]
            if reinit_denoiser:
                model = transformer_cls.from_config(transformer_cls.load_config(root, subfolder=subfolder))
                return model.to(dtype) if dtype != torch.float32 else model
            if quantization is not None:
                return _load_quantized(transformer_cls, root, quantization, dtype, subfolder=subfolder)
            return transformer_cls.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype)

        self.denoiser = load_denoiser("transformer")
        if two_experts:  # Wan 2.2 A14B: high-noise transformer, low-noise transformer_2, one denoiser of the two
            if index.get("boundary_ratio") is None:
                raise ValueError(f"pipeline {root} has two experts (transformer, transformer_2) but no boundary_ratio "
                                 "in model_index.json to switch between them")
            self.denoiser = TwoExpertDenoiser(self.denoiser, load_denoiser("transformer_2"), index["boundary_ratio"],
                                              trained=tuple(EXPERTS) if train_experts is None else train_experts)
        self.expert_lr = self._check_expert_lr(expert_lr)
        if guidance_scale_2 is not None and (not two_experts or isinstance(guidance_scale_2, bool)
                                             or not isinstance(guidance_scale_2, (int, float)) or guidance_scale_2 < 0):
            raise ValueError(f"guidance_scale_2={guidance_scale_2!r} must be a non-negative number for a two-expert "
                             "pipeline (Wan 2.2 A14B's low-noise expert); this pipeline has "
                             f"{'two experts' if two_experts else 'one transformer'}")
        self.guidance_scale_2 = guidance_scale_2
        self.default_lora_targets = self.family.lora_targets
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

        for te, tok in self.family.text_pairs:  # text_encoder, tokenizer (, text_encoder_2, tokenizer_2)
            setattr(self, te, classes[te].from_pretrained(root, subfolder=te, torch_dtype=frozen))
            getattr(self, te).requires_grad_(False).eval()
            setattr(self, tok, classes[tok].from_pretrained(root, subfolder=tok))
        if "vae" in classes:
            self.vae = classes["vae"].from_pretrained(root, subfolder="vae", torch_dtype=frozen)
            self.vae.requires_grad_(False).eval()
        else:
            self.vae = None
        for name in self.family.frozen_components:  # loaded by the family itself (LTX-2's text connectors)
            setattr(self, name, self.family.load_component(root, index, name, frozen).requires_grad_(False).eval())
        # Image-to-video pipelines (Wan 2.1 I2V) may carry an image encoder and its processor; None otherwise.
        self.image_encoder, self.image_processor = load_image_encoder(root, index, frozen)
        self.max_sequence_length = max_sequence_length or self.family.max_sequence_length
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise ValueError(f"fps must be a positive number of frames per second or None, got {fps!r}")
        builtin = BUILTIN_FPS.get(pretrained_model_name_or_path.removeprefix(BUILTIN_PREFIX)) \
            if pretrained_model_name_or_path.startswith(BUILTIN_PREFIX) else None
        self.fps = float(fps or builtin or self.family.default_fps)
        self.default_sampling_shift = _scheduler_shift(root)
        self.scheduler = load_scheduler(root, index)  # the pipeline's own sampler (UniPC for Wan), or None
        patch, patch_t = self.denoiser.config.get("patch_size", (1, 1, 1)), self.denoiser.config.get("patch_size_t", 1)
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (patch_t or 1, patch, patch)
        self.family.check_backbone(self)  # e.g. an I2V transformer without the image encoder it needs
        # from_pretrained returns modules in eval mode and Lightning keeps submodule modes as it finds them, so put
        # the denoiser in this module's mode explicitly: it trains in train mode (dropout, LoRA dropout active).
        self.train(self.training)

    def _check_expert_lr(self, expert_lr: dict[str, float] | None) -> dict[str, float]:
        if not expert_lr:
            return {}
        if not isinstance(self.denoiser, TwoExpertDenoiser):
            raise ValueError(f"expert_lr={expert_lr!r} needs a two-expert pipeline (Wan 2.2 A14B); this one has one "
                             "transformer")
        if not isinstance(expert_lr, dict):
            raise ValueError(f"expert_lr must map expert names to learning rates, got {expert_lr!r}")
        names = check_experts(list(expert_lr), "expert_lr")
        untrained = [n for n in names if n not in self.denoiser.trained]
        bad = {k: v for k, v in expert_lr.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
        if untrained or bad:
            raise ValueError(f"expert_lr must give positive learning rates to trained experts "
                             f"{list(self.denoiser.trained)}, got {expert_lr!r}")
        return {k: float(v) for k, v in expert_lr.items()}

    @property
    def training_sigma_range(self) -> tuple[float, float]:
        """Where training sigmas are drawn: the trained experts' range for Wan 2.2 A14B, else ``(0, 1)``."""
        return self.denoiser.sigma_range if isinstance(self.denoiser, TwoExpertDenoiser) else (0.0, 1.0)

    def guidance_at(self, sigma: Tensor, guidance_scale: float) -> float | Tensor:
        """With ``guidance_scale_2``, that scale where the low-noise expert runs (``sigma`` below the boundary), as
        ``WanPipeline`` does; ``guidance_scale`` elsewhere."""
        if self.guidance_scale_2 is None:
            return guidance_scale
        low = ~self.denoiser.high_noise_at(sigma * 1000)
        return torch.where(low, float(self.guidance_scale_2), float(guidance_scale))

    def trains_at(self, sigma: Tensor) -> Tensor:
        """For one expert of Wan 2.2 A14B, whether that expert runs at each ``sigma`` (the pipeline's switch)."""
        if not isinstance(self.denoiser, TwoExpertDenoiser):
            return super().trains_at(sigma)
        return self.denoiser.trains_at(sigma * 1000)

    def parameter_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """Optimizer groups: one per trained expert of a two-expert pipeline (with its ``expert_lr``), else one."""
        if not isinstance(self.denoiser, TwoExpertDenoiser):
            return super().parameter_groups(params)
        groups = self.denoiser.parameter_groups(params)
        for group in groups:
            if group["name"] in self.expert_lr:
                group["lr"] = self.expert_lr[group["name"]]
        return groups

    def set_timesteps_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """What the family's pipeline passes to ``scheduler.set_timesteps`` (LTX-Video: sigmas, ``mu``; Wan: none)."""
        return self.family.set_timesteps_kwargs(self.scheduler, num_steps, tuple(latent_shape))

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def supports_context_parallel(self) -> bool:
        """Whether diffusers can split a video's tokens across devices for this denoiser: its class defines a
        ``_cp_plan`` (Wan, LTX-Video, LTX-2 in diffusers 0.42; not HunyuanVideo). A property, as the family is known
        per instance."""
        return getattr(type(self.denoiser), "_cp_plan", None) is not None

    @property
    def supports_causal(self) -> bool:
        """Whether the denoiser can run block-causally with a KV cache (:mod:`lit_videoalign.backbones.causal`): one
        diffusers ``WanTransformer3DModel`` (Wan 2.1, the toy world; not Wan 2.2 A14B's two experts nor TI2V's
        per-token image timesteps)."""
        from diffusers import WanTransformer3DModel

        return isinstance(self.denoiser, WanTransformer3DModel) and not self.model_index.get("expand_timesteps")

    @property
    def supports_images(self) -> bool:
        """Whether this pipeline is image-to-video (Wan 2.1 I2V / FLF2V: its transformer takes the image's latents as
        extra channels). A property, as the family and its variant are known per instance."""
        return self.family.supports_images(self)

    @property
    def is_quantized(self) -> bool:
        """Whether the denoiser's base weights are bitsandbytes-quantized (train only LoRA on it)."""
        return bool(getattr(self.denoiser, "is_quantized", False))

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The frozen modules that encode prompts: text encoders and the family's own (LTX-2's connectors)."""
        return [getattr(self, te) for te in (*self.family.text_encoders, *self.family.frozen_components)]

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """``_no_split_modules`` of the denoiser, or its ``_repeated_blocks`` where it has none (LTX-Video)."""
        found = super().block_classes
        if found:
            return found
        names = set(getattr(self.denoiser, "_repeated_blocks", None) or ())
        return tuple(sorted({type(m) for m in self.denoiser.modules() if type(m).__name__ in names},
                            key=lambda c: c.__name__))

    def train(self, mode: bool = True) -> DiffusersVideoBackbone:
        """Only the denoiser follows train mode; the frozen components stay in eval."""
        super().train(mode)
        for text_encoder in self.text_encoders:
            text_encoder.eval()
        if self.vae is not None:
            self.vae.eval()
        if self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    # -- prompts --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Tokenise to ``max_sequence_length`` and run the frozen text encoder(s) as the family's pipeline does.

        Returns embeds ``(b, l, d)`` in the denoiser's dtype, the token mask ``(b, l)`` and family extras
        (HunyuanVideo: ``extra["pooled_projections"]`` and ``extra["guidance"]``).
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; expected at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a string, got {shorten(bad[0])}")
        self._check_prompt_lengths(prompts)
        return self.family.encode_prompts(self, list(prompts))

    def _check_prompt_lengths(self, prompts: list[str]) -> None:
        """Refuse (``strict_prompts``) or warn once about prompts longer than ``max_sequence_length`` tokens."""
        if self._warned_truncation and not self.strict_prompts:
            return
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        long = [(n, p) for n, p in zip(lengths, prompts) if n > self.max_sequence_length]
        if not long:
            return
        n, prompt = max(long, key=lambda x: x[0])
        what = (f"{len(long)} of {len(prompts)} prompts are longer than max_sequence_length={self.max_sequence_length} "
                f"tokens (the longest, {n} tokens: {shorten(prompt)})")
        if self.strict_prompts:
            raise ValueError(f"{what}; shorten them or raise max_sequence_length (strict_prompts=True)")
        self._warned_truncation = True
        warnings.warn(f"{what} and are truncated to {self.max_sequence_length} tokens, as the pipeline does; shorten "
                      "them, raise max_sequence_length, or set strict_prompts=True to refuse them (warned once)",
                      UserWarning, stacklevel=3)

    # -- images ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor, cond: Conditioning, *, num_frames: int,
                      last_images: Tensor | None = None) -> Conditioning:
        """``cond`` with conditioning ``images`` ``(b, 3, h, w)`` in ``[0, 1]``, the first frames of videos of
        ``num_frames`` frames at ``h x w`` (and, for FLF2V, ``last_images``), encoded once as the family's pipeline
        does them (:meth:`~lit_videoalign.backbones.families.WanFamily.encode_images`); :meth:`predict_velocity`
        applies them."""
        if not self.supports_images:
            config = self.denoiser.config
            raise ValueError(f"{type(self).__name__} ({self.family.name}, {type(self.denoiser).__name__} with "
                             f"{config.get('in_channels')} input channels) is text-to-video only; it cannot be "
                             "conditioned on images (load an image-to-video pipeline, e.g. WanImageToVideoPipeline)")
        _check_images(images, "images", len(cond))
        if last_images is not None:
            _check_images(last_images, "last_images", len(cond))
            if last_images.shape != images.shape:
                raise ValueError(f"last_images must have the shape of images {tuple(images.shape)}, got "
                                 f"{tuple(last_images.shape)}")
        self.latent_shape(num_frames, images.shape[2], images.shape[3])  # the frame count and size rules
        encoded = self.family.encode_images(self, images, num_frames, last_images)
        device = cond.prompt_embeds.device
        plain = Conditioning(cond.prompt_embeds, cond.prompt_mask, {k: v.to(device) for k, v in encoded.items()},
                             images.to(device))
        return cond.with_images_from(plain)

    # -- videos and latents ---------------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        pt, ph, pw = self.patch_size
        if self.vae is None:
            config = self.denoiser.config  # pixel space: the output channels (an I2V model takes more in)
            t, h, w, c = num_frames, height, width, config.out_channels or config.in_channels
        else:
            ft, fs = self.family.vae_compression(self.vae)
            if (num_frames - 1) % ft:
                raise ValueError(f"num_frames must be 1 + {ft}k for this VAE, got {num_frames}")
            if height % fs or width % fs:
                raise ValueError(f"height and width must be multiples of {fs} for this VAE, got {height}x{width}")
            t, h, w, c = (num_frames - 1) // ft + 1, height // fs, width // fs, self.family.latent_channels(self.vae)
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size {t}x{h}x{w} for {num_frames}x{height}x{width} frames is not divisible by "
                             f"the transformer patch size {self.patch_size}")
        return (c, t, h, w)

    def encode_videos(self, videos: Tensor) -> Tensor:
        check_video(videos, batched=True, name="videos")
        x = videos.permute(0, 2, 1, 3, 4) * 2 - 1  # (b, c, t, h, w) in [-1, 1]
        self.latent_shape(videos.shape[1], videos.shape[3], videos.shape[4])
        if self.vae is None:
            return x.to(self.denoiser.dtype)
        with torch.no_grad():
            latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()  # deterministic: the posterior mean
            return self.family.normalize_latents(self.vae, latents).to(self.denoiser.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape [B, C, T', H', W'], got shape {tuple(latents.shape)}")
        if self.vae is None:
            x = latents.float()
        else:
            z = self.family.denormalize_latents(self.vae, latents.to(self.vae.dtype))
            x = self.family.decode_vae(self.vae, z).float()  # differentiable: reward gradients flow through
        # The decoder's range is [-1, 1] only approximately; map to [0, 1] the way diffusers' postprocessing does.
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()  # (b, t, c, h, w)

    # -- denoiser -------------------------------------------------------------------------------------------------
    def predict_velocity(self, latents: Tensor, sigma: float | Tensor, cond: Conditioning,
                         denoiser: nn.Module | None = None) -> Tensor:
        """Velocity ``noise - x0`` at ``(latents, sigma)``; the transformer sees ``timestep = sigma * 1000``.

        The transformer is called exactly as the family's diffusers pipeline calls it (LTX: packed tokens, unpacked
        here); the output is in the latent layout ``[B, C, T', H', W']``.

        Args:
            latents: ``[B, C, T', H', W']``.
            sigma: float or ``Tensor[B]`` in ``[0, 1]``.
            cond: from :meth:`encode_prompts`, batch ``B``.
            denoiser: another module of the same architecture to run instead (e.g. a frozen reference copy).
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape [B, C, T', H', W'], got shape {tuple(latents.shape)}")
        if len(cond) != latents.shape[0]:
            raise ValueError(f"conditioning batch {len(cond)} does not match latents batch {latents.shape[0]}")
        model = denoiser if denoiser is not None else self.denoiser
        b = latents.shape[0]
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        if sigma_t.ndim == 0:
            sigma_t = sigma_t.expand(b)
        _broadcast(sigma_t, latents)  # validates the shape
        timestep = sigma_t * 1000
        out = self.family.call_transformer(self, model, latents.to(model.dtype), timestep, cond.to(dtype=model.dtype))
        return out.to(latents.dtype)

    # -- saving ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, merge_lora: bool = True) -> Path:
        """Write the whole pipeline as a diffusers folder (safetensors), atomically.

        With a LoRA adapter attached, the adapter is merged into a copy of the denoiser (``merge_lora=True``) or
        saving is refused, so the folder always loads as a plain pipeline.
        """
        path = Path(path)
        denoiser = self.denoiser
        if self.has_lora:
            if not merge_lora:
                raise ValueError("the denoiser has a LoRA adapter; pass merge_lora=True to save merged weights")
            denoiser = copy.deepcopy(self.denoiser)
            denoiser.fuse_lora()
            denoiser.unload_lora()
        with atomic_dir(path) as tmp:
            experts = {EXPERTS[n]: denoiser.expert(n) for n in EXPERTS} if isinstance(denoiser, TwoExpertDenoiser) \
                else {"transformer": denoiser}
            for folder, model in experts.items():  # Wan 2.2 A14B: high noise -> transformer/, low -> transformer_2/
                model.save_pretrained(tmp / folder, safe_serialization=True)
            for te, tok in self.family.text_pairs:
                getattr(self, te).save_pretrained(tmp / te, safe_serialization=True)
                getattr(self, tok).save_pretrained(tmp / tok)
            for name in self.family.frozen_components:
                getattr(self, name).save_pretrained(tmp / name, safe_serialization=True)
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            if self.image_encoder is not None:
                self.image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
                self.image_processor.save_pretrained(tmp / image_processor_name(self.model_index))  # as listed
            index = dict(self.model_index)
            for folder, model in experts.items():
                index[folder] = ["diffusers", type(model).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            for extra in ("scheduler", *self.family.copied_components):
                src = self._root / extra
                if src.is_dir():
                    shutil.copytree(src, tmp / extra)
        return path
