"""``AlignmentModule``: the plumbing every objective shares, and no method-specific maths.

It owns the backbone, optional LoRA, the optimizer and scheduler callables (so YAML configs pick them), the
reference model (the adapter-disabled base under LoRA, a frozen copy otherwise, built only when an objective asks
for it), prompt dropout for classifier-free guidance, and the Euler ODE sampler with guidance that lets every
objective generate videos. It also makes every objective safe to run for days: a NaN or infinite loss, gradient or
reward skips its optimizer step (and enough of them in a row stop the run), and checkpoints carry the RNG states so
a resumed run continues exactly (see ``on_save_checkpoint``).
"""

from __future__ import annotations

import copy
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning, VideoBackbone
from lit_videoalign.backbones.fingerprint import backbone_fingerprint, check_fingerprint
from lit_videoalign.schedules.flow import euler_sample, sampling_sigmas
from lit_videoalign.schedules.samplers import (
    Generators,
    check_sampler,
    scheduler_sample,
    seeded_noise,
)

# The frozen VAE and text encoder stay in eval mode on purpose (no dropout, fixed norms); Lightning's generic
# warning about eval-mode modules at the start of fit says nothing useful here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (lr 1e-4, no weight decay), its update fused into one kernel where every parameter's device has it (CPU,
    CUDA; sharded DTensors too): the same update within float32 rounding, and on CPU (torch 2.14) 2.6x faster for 262 k
    LoRA parameters, 5.6x for 4.8 M, than the for-each kernels, which other devices keep."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = list(params)
    devices = set(_get_fused_kernels_supported_devices())
    fused = bool(params) and all(isinstance(p, Tensor) and p.is_floating_point() and p.device.type in devices
                                 for p in params)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused or None)


# peft's adapter weights (LoRA A/B, embedding A/B, DoRA magnitudes) in state-dict keys
_ADAPTER_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


class NonFiniteError(RuntimeError):
    """Raised when ``max_consecutive_nonfinite`` optimizer steps in a row were skipped for a NaN or infinite value."""


def rng_states() -> dict:
    """The torch (CPU and CUDA), numpy and Python RNG states, as tensors and primitives only (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                         gauss), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class AlignmentModule(L.LightningModule):
    """Base LightningModule of every post-training objective.

    Args:
        backbone: the video model, e.g. a :class:`~lit_videoalign.backbones.diffusers.DiffusersVideoBackbone`.
        optimizer: callable ``params -> Optimizer`` (LightningCLI fills it from ``optimizer:`` in YAML).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``.
        lora_rank: attach a peft LoRA adapter of this rank and train only it; None trains the full denoiser.
        lora_alpha: LoRA alpha; defaults to the rank.
        lora_target_modules: module names to adapt; defaults to the backbone family's attention projections.
        num_frames: frames of generated videos.
        height: height of generated videos.
        width: width of generated videos.
        num_inference_steps: Euler steps of the sampler.
        guidance_scale: classifier-free guidance scale at sampling (1.0 disables it).
        sampling_shift: sigma shift of the sampling grid; None takes the backbone's (its scheduler config's).
        negative_prompt: the unconditional prompt for guidance and prompt dropout.
        max_consecutive_nonfinite: stop the run (:class:`NonFiniteError`) after this many optimizer steps in a row
            were skipped for a NaN or infinite loss, gradient or reward. A single one only skips its step.
    """

    requires_reference: bool = False  # objectives that need the reference policy set this

    def __init__(
        self,
        backbone: VideoBackbone,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 40,
        guidance_scale: float = 1.0,
        sampling_shift: float | None = None,
        negative_prompt: str = "",
        max_consecutive_nonfinite: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VideoBackbone):
            raise TypeError(f"backbone must be a VideoBackbone, got {type(backbone).__name__}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be non-negative, got {guidance_scale}")
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be at least 1, got {max_consecutive_nonfinite}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward", "critic_optimizer"])
        self.backbone = backbone
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        backbone.latent_shape(num_frames, height, width)  # fail early on an impossible video size
        if lora_rank is not None:
            backbone.add_lora(lora_rank, lora_alpha, lora_target_modules)
        self._reference_denoiser: nn.Module | None = None
        self.reward: nn.Module | None = None  # a frozen judge, for objectives that hold one (:meth:`hold_reward`)
        self._nonfinite: list[str] = []  # what was NaN or infinite since the last optimizer step
        self.nonfinite_skips = 0  # optimizer steps skipped so far (kept in checkpoints)
        self.reward_failures = 0  # reward calls that raised so far (kept in checkpoints; see :meth:`reward_scores`)
        self._consecutive_nonfinite: dict[int, int] = {}  # per optimizer index: skipped steps in a row
        self._rng_before_validation: dict | None = None
        self._rng_to_restore: dict | None = None
        if self.requires_reference and not backbone.has_lora:
            self._reference_denoiser = copy.deepcopy(backbone.denoiser).requires_grad_(False).eval()

    @property
    def sampling_shift(self) -> float:
        shift = self.hparams.sampling_shift
        return self.backbone.default_sampling_shift if shift is None else shift

    # -- optimisation ---------------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: every weight of the backbone is frozen")
        optimizer = self.optimizer_fn(self.backbone.parameter_groups(params))
        if self.lr_scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_fn(optimizer),
                                                          "interval": "step"}}

    # -- non-finite guard ------------------------------------------------------------------------------------------
    def report_nonfinite(self, what: str) -> None:
        """Note that ``what`` (``"loss"``, ``"gradient"``, ``"reward"``, ...) was NaN or infinite in this step: the
        next optimizer step is skipped. Losses and gradients are checked here already; objectives report the rest."""
        self._nonfinite.append(what)

    def skip_nonfinite_step(self, what: str, optimizer_idx: int = 0) -> None:
        """Count a step an objective skipped itself, without calling the optimizer, because ``what`` was non-finite
        (e.g. GRPO when every reward of a rollout batch is NaN)."""
        self._nonfinite.clear()
        self._count_nonfinite([what], optimizer_idx)

    def _count_nonfinite(self, found: list[str], optimizer_idx: int) -> None:
        limit = self.hparams.get("max_consecutive_nonfinite", 3)
        what = " and ".join(dict.fromkeys(found))
        step = self.trainer.global_step if self._trainer is not None else 0
        self.nonfinite_skips += 1
        run = self._consecutive_nonfinite.get(optimizer_idx, 0) + 1
        self._consecutive_nonfinite[optimizer_idx] = run
        self.log("train/nonfinite_skips", float(self.nonfinite_skips))
        if run >= limit:
            raise NonFiniteError(
                f"{run} optimizer steps in a row had a NaN or infinite {what} (the last at global step {step}); the "
                f"run is stopped with the weights of the last finite step. Lower the learning rate, check the data "
                f"and the reward, or raise model.init_args.max_consecutive_nonfinite (now {limit})")
        rank_zero_warn(f"NaN or infinite {what} at global step {step}: the optimizer step is skipped and the weights "
                       f"are unchanged ({run} in a row; the run stops at {limit})")

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self.report_nonfinite("loss")

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        """Called after the gradients of a step are ready, before the optimizer uses them (automatic and manual
        optimisation alike). A step with a non-finite loss, gradient or reported value loses its gradients, so the
        optimizer leaves the weights and its own state untouched; under fp16 loss scaling non-finite gradients are the
        ``GradScaler``'s business (it skips the step and lowers the scale)."""
        found, self._nonfinite = self._nonfinite, []
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not found and scaler is None and not _finite_gradients(optimizer):  # a NaN loss explains NaN gradients
            found.append("gradient")
        skip = self.trainer.strategy.reduce_boolean_decision(bool(found), all=False)  # every rank skips together
        idx = next((i for i, o in enumerate(self.trainer.optimizers) if o is optimizer), 0)
        if skip:
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients
            self._count_nonfinite(found or ["value on another rank"], idx)
        else:
            self._consecutive_nonfinite[idx] = 0
            if self.nonfinite_skips:  # the count stays on the charts once there is one
                self.log("train/nonfinite_skips", float(self.nonfinite_skips))

    def last_step_skipped(self, optimizer_idx: int = 0) -> bool:
        """Whether the latest step of optimizer ``optimizer_idx`` was skipped by the non-finite guard."""
        return self._consecutive_nonfinite.get(optimizer_idx, 0) > 0

    # -- exact resume -----------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the RNG states and the guard's counters, so a resumed run draws the same noise, sigmas, dropout and
        rollouts as an uninterrupted one. Objectives that override this call ``super()`` first."""
        checkpoint["rng_states"] = self._rng_before_validation or rng_states()
        checkpoint["nonfinite_guard"] = {"skips": self.nonfinite_skips,
                                         "consecutive": dict(self._consecutive_nonfinite),
                                         "reward_failures": self.reward_failures}
        if self.frozen_base:  # the state dict leaves the base out (see ``state_dict``): say which base it needs
            checkpoint["frozen_base_fingerprint"] = self.base_fingerprint()

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before any weight is restored: a trainable-only checkpoint goes only on the base it was trained on.
        where = self.trainer.ckpt_path if self._trainer is not None and self.trainer.ckpt_path else "the checkpoint"
        if checkpoint.get("frozen_base_fingerprint") is not None:
            check_fingerprint(checkpoint["frozen_base_fingerprint"], self.base_fingerprint(), str(where))
        self._rng_to_restore = checkpoint.get("rng_states")
        guard = checkpoint.get("nonfinite_guard", {})
        self.nonfinite_skips = int(guard.get("skips", 0))
        self._consecutive_nonfinite = {int(k): int(v) for k, v in guard.get("consecutive", {}).items()}
        self.reward_failures = int(guard.get("reward_failures", 0))

    @override
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The first step of a resumed fit starts from the RNG states of the checkpoint. Restored here, not earlier:
        # on restart Lightning re-creates the validation loader (which draws a seed from the global RNG) and may
        # finish an interrupted validation before the first batch.
        if self._rng_to_restore is not None and self.trainer.ckpt_path is not None:
            set_rng_states(self._rng_to_restore)
        self._rng_to_restore = None

    @override
    def on_validation_model_zero_grad(self) -> None:
        # Called by the training loop just before it validates: validation (its loader's seeds, its sampling) must
        # not move the training RNG, or a run resumed after a validation point would draw other numbers.
        super().on_validation_model_zero_grad()
        self._rng_before_validation = rng_states()

    @override
    def on_validation_end(self) -> None:
        # After the callbacks' on_validation_end (sample logging, checkpoints that monitor a validation metric).
        if self._rng_before_validation is not None:
            set_rng_states(self._rng_before_validation)
            self._rng_before_validation = None

    # -- distribution ---------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Called by the Trainer at the start of ``fit``/``validate``/``test``, after ``setup`` and before the optimizer
        is created.

        Under Lightning's ``ModelParallelStrategy`` (``self.device_mesh`` is set) it shards every copy of the denoiser
        (trainable, frozen reference, teacher, critic) with FSDP2, block by block
        (:func:`~lit_videoalign.strategies.apply_fsdp2`); with ``trainer.precision: bf16-mixed`` the gathered
        parameters compute in bf16 and gradients reduce in float32. It then compiles the transformer blocks when the
        backbone asks for it (``compile_blocks``). Under other strategies sharding is the strategy's job
        (``BlockFSDPStrategy``). An objective that builds extra models keeps all of this by building them in
        ``__init__`` (or calling ``super().configure_model()`` after building them here).
        """
        from lit_videoalign.strategies import apply_fsdp2, compile_blocks

        if self.backbone.is_quantized and not self.backbone.has_lora:
            raise ValueError("the denoiser is quantized (backbone quantization=...), so only a LoRA adapter can be "
                             "trained on it; set lora_rank")
        if self.device_mesh is not None:
            precision = str(self.trainer.precision) if self._trainer is not None else ""
            mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
            apply_fsdp2(self, self.device_mesh, param_dtype=mixed, reduce_dtype=torch.float32 if mixed else None)
        if self.backbone.compile_blocks:
            compile_blocks(self)

    # -- conditioning ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], dropout: float = 0.0) -> Conditioning:
        """Encode prompts, replacing each with the negative prompt with probability ``dropout`` (for CFG)."""
        prompts = list(prompts)
        if dropout > 0:
            drop = (torch.rand(len(prompts)) < dropout).tolist()
            prompts = [self.hparams.negative_prompt if d else p for p, d in zip(prompts, drop)]
        return self.backbone.encode_prompts(prompts)

    def batch_conditioning(self, batch: dict, dropout: float = 0.0) -> Conditioning:
        """The batch's conditioning: precomputed (``batch["cond"]``, from ``videoalign precompute``, no text encoder
        run) or its ``"prompt"`` encoded; prompt dropout as in :meth:`encode_prompts` either way. A batch
        ``"image"`` ``(b, 3, h, w)`` (image-to-video) is encoded too, for the batch's videos; dropout keeps it."""
        if "cond" in batch:
            from lit_videoalign.data.precomputed import precomputed_conditioning

            cond = precomputed_conditioning(batch, dropout, self.hparams.negative_prompt)
        else:
            cond = self.encode_prompts(batch["prompt"], dropout=dropout)
        frames = batch["video"].shape[1] if "video" in batch else None
        return self.with_images(cond, batch.get("image"), num_frames=frames)

    def with_images(self, cond: Conditioning, images: Tensor | None, repeats: int = 1,
                    num_frames: int | None = None) -> Conditioning:
        """``cond`` conditioned also on ``images`` (image-to-video), one image per ``repeats`` samples in a row (a
        rollout group), each encoded once for videos of ``num_frames`` (the module's by default); None: ``cond``."""
        if images is None:
            return cond
        once = self.backbone.encode_images(images.to(self.device), cond.index(slice(None, None, repeats)),
                                           num_frames=num_frames or self.hparams.num_frames)
        return cond.with_images_from(once.repeat_interleave(repeats))

    # -- the reward (a frozen judge) -------------------------------------------------------------------------------
    def hold_reward(self, reward: nn.Module | None) -> None:
        """Hold ``reward`` as ``self.reward``: frozen (no gradients reach it, so it stays out of the optimizer and, over
        a frozen base, out of trainable-only checkpoints) and in eval mode for good (see :meth:`train`). None holds
        none."""
        self.reward = reward.requires_grad_(False).eval() if reward is not None else None

    @override
    def train(self, mode: bool = True):
        """Train mode for everything but the held reward: rewards are judges, never in training mode (no dropout,
        fixed normalisation statistics)."""
        super().train(mode)
        if self.reward is not None:
            self.reward.eval()
        return self

    def reward_scores(self, videos: Tensor, prompts: list[str], who: str, consequence: str,
                      key: str = "overall", references: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """The held reward's scores of ``videos`` and the mask ``Tensor[B]`` of samples whose ``key`` score is finite.
        If the reward raises, every score is NaN and every sample masked (:func:`guarded_scores` warns, naming
        ``who`` and the ``consequence``), and :attr:`reward_failures` counts the call. ``references``: the videos'
        conditioning images (image-to-video), which rewards that compare against a reference (``identity``) use."""
        scores = guarded_scores(self.reward, videos, prompts, who, consequence, fps=self.backbone.fps,
                                references=references)
        if scores is None:
            self.reward_failures += 1
            n = videos.shape[0]
            nan = torch.full((n,), float("nan"), device=videos.device)
            return {"overall": nan, key: nan}, torch.zeros(n, dtype=torch.bool, device=videos.device)
        return scores, torch.isfinite(scores[key])

    def validate_with_reward(self, batch: dict, batch_idx: int, prog_bar: bool = True) -> None:
        """The reward-scoring validation step: videos of the batch's held-out prompts from :meth:`generate` (seeds
        ``1000 * batch_idx + i``, so every validation draws the same noise), scored by the held reward and logged as
        ``val/reward/{dimension}`` (``overall`` on the progress bar when ``prog_bar``). Without a reward it does
        nothing."""
        if self.reward is None:
            return
        prompts = list(batch["prompt"])
        videos = self.generate(prompts, [batch_idx * 1000 + i for i in range(len(prompts))], images=batch.get("image"))
        with torch.no_grad():
            scores = self.reward(videos, prompts, references=batch.get("image"), fps=self.backbone.fps)
        for dim, values in scores.items():
            self.log(f"val/reward/{dim}", values.float().mean(), batch_size=len(prompts),
                     prog_bar=prog_bar and dim == "overall")

    # -- reference model ------------------------------------------------------------------------------------------
    def reference_velocity(self, latents: Tensor, sigma: float | Tensor, cond: Conditioning) -> Tensor:
        """Velocity of the frozen reference policy (no gradients)."""
        with torch.no_grad():
            if self.backbone.has_lora:
                with self.backbone.adapters_disabled():
                    return self.backbone.predict_velocity(latents, sigma, cond)
            if self._reference_denoiser is None:
                raise RuntimeError(f"{type(self).__name__} did not ask for a reference model (requires_reference)")
            return self.backbone.predict_velocity(latents, sigma, cond, denoiser=self._reference_denoiser)

    # -- what checkpoints hold ---------------------------------------------------------------------------------
    # Key prefixes of tensors an objective changes without gradients outside LoRA adapters (which are always kept), so
    # that trainable-only checkpoints keep them too.
    checkpoint_keeps: tuple[str, ...] = ()

    @property
    def frozen_base(self) -> bool:
        """Whether the backbone's weights are a frozen base under LoRA adapters. Checkpoints then hold only what
        trains (:meth:`state_dict`) and the base's fingerprint; full fine-tuning keeps full checkpoints."""
        return self.backbone.has_lora

    def base_fingerprint(self) -> dict:
        """The frozen base's fingerprint (:func:`~lit_videoalign.backbones.fingerprint.backbone_fingerprint`),
        computed once."""
        if getattr(self, "_base_fingerprint", None) is None:
            self._base_fingerprint = backbone_fingerprint(self.backbone)
        return self._base_fingerprint

    def frozen_state_dict(self) -> dict[str, Tensor]:
        """The tensors trainable-only checkpoints leave out (empty without a frozen base): every parameter that does
        not train, except LoRA adapters (trained, or moved by an EMA like NFT's ``"old"`` and consistency's ``"ema"``)
        and :attr:`checkpoint_keeps`, and the backbone's buffers. They come back from the pipeline when the module is
        built; the frozen reference copy is left out of every checkpoint."""
        if not self.frozen_base:
            return {}
        keep = self.checkpoint_keeps
        frozen = {n for n, p in self.named_parameters(remove_duplicate=False)
                  if not p.requires_grad and not _ADAPTER_KEY.search(n) and not n.startswith(keep)}
        frozen |= {n for n, _ in self.named_buffers(remove_duplicate=False)
                   if n.startswith("backbone.") and not n.startswith(keep)}

        def of_frozen(key: str) -> bool:  # the key, or extra state saved under it (a 4-bit weight's ".absmax", ...)
            parts = key.split(".")
            return any(".".join(parts[:i]) in frozen for i in range(len(parts), 0, -1))

        return {k: v for k, v in super().state_dict().items() if of_frozen(k)}

    @override
    def state_dict(self, *args, **kwargs):
        # The frozen reference copy is rebuilt from the backbone at init; do not store it twice in checkpoints. Over a
        # frozen base, leave the base out too: a LoRA checkpoint of a 14B model holds its adapters, not 30 GB of base.
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        frozen = {prefix + k for k in self.frozen_state_dict()}
        for key in [k for k in state if k.startswith(prefix + "_reference_denoiser.") or k in frozen]:
            del state[key]
        return state

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # What checkpoints leave out comes from this module, as built: the reference copy, and the frozen base of a
        # trainable-only checkpoint (``on_load_checkpoint`` checked its fingerprint). Keys that train stay required.
        own = dict(self.frozen_state_dict())
        if self._reference_denoiser is not None:
            own.update({f"_reference_denoiser.{k}": v for k, v in self._reference_denoiser.state_dict().items()})
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)

    # -- sampling -------------------------------------------------------------------------------------------------
    def initial_noise(self, seeds: Sequence[int], num_frames: int | None = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        """One latent-noise tensor per seed, drawn on CPU so a seed gives the same video on every device."""
        hp = self.hparams
        shape = self.backbone.latent_shape(num_frames or hp.num_frames, height or hp.height, width or hp.width)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    def guided_velocity_fn(self, cond: Conditioning, guidance_scale: float,
                           uncond: Conditioning | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x, sigma) -> velocity`` with classifier-free guidance ``v_u + g * (v_c - v_u)`` in one batched call."""
        if guidance_scale == 1.0:
            return lambda x, s: self.backbone.predict_velocity(x, s, cond)
        if uncond is None:
            uncond = self.backbone.encode_prompts([self.hparams.negative_prompt] * len(cond))
        if cond.images is not None and uncond.images is None:  # the unconditional branch keeps the image (I2V)
            uncond = uncond.with_images_from(cond)
        both = Conditioning.cat([cond, uncond])

        def velocity(x: Tensor, s: Tensor) -> Tensor:
            v_c, v_u = self.backbone.predict_velocity(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
            scale = self.backbone.guidance_at(s, guidance_scale)  # Wan 2.2 A14B: guidance_scale_2 at low noise
            if isinstance(scale, Tensor):
                scale = scale.to(v_c.dtype).view(-1, *[1] * (v_c.ndim - 1))
            return v_u + scale * (v_c - v_u)

        return velocity

    def sample_latents(self, noise: Tensor, cond: Conditioning, *, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, generator: Generators = None,
                       uncond: Conditioning | None = None, sampler: str | None = None) -> Tensor:
        """How this model samples: latents ``(b, c, t, h, w)`` from ``noise`` of the same shape, conditioned on
        ``cond``. The one sampling entry point (DESIGN section 7): ``generate``, rollouts, callbacks and inference-time
        methods call it, so a model that samples differently (a few-step student) overrides this alone.

        The base, with classifier-free guidance either way:

        - ``sampler="euler"`` (and None, the default, which training rollouts rely on): the Euler ODE on
          :func:`~lit_videoalign.schedules.flow.sampling_sigmas`; gradients flow if the caller enables them;
        - ``sampler="pipeline"``: the backbone's own diffusers scheduler (UniPC with ``flow_shift`` for Wan), stepped
          as the diffusers pipeline steps it (:func:`~lit_videoalign.schedules.samplers.scheduler_sample`), which is
          what ``generate`` uses. A backbone without a scheduler (``backbone.scheduler is None``) samples with the
          Euler ODE instead.

        A student that overrides this samples with its own sampler whatever ``sampler`` says.

        Args:
            noise: initial latents at sigma 1.
            cond: prompt conditioning, batch first.
            num_inference_steps: sampler steps; None takes the module's.
            guidance_scale: classifier-free guidance; None takes the module's (1.0 disables it).
            generator: for stochastic samplers, one for the batch or one per sample (the Euler ODE draws nothing).
            uncond: the negative-prompt conditioning (encoded here when guidance needs it and it is None).
            sampler: ``"pipeline"``, ``"euler"`` or None (the module's default: Euler).
        """
        check_sampler(sampler)
        steps = num_inference_steps or self.hparams.num_inference_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        velocity = self.guided_velocity_fn(cond, scale, uncond)
        scheduler = self.backbone.scheduler if sampler == "pipeline" else None
        if scheduler is None:
            return euler_sample(velocity, noise, sampling_sigmas(steps, shift=self.sampling_shift))
        kwargs = self.backbone.set_timesteps_kwargs(steps, tuple(noise.shape[1:]))  # e.g. LTX-Video's sigmas and mu
        return scheduler_sample(scheduler, velocity, noise, steps, generator, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        return_latents: bool = False,
        sampler: str | None = "pipeline",
        images: Tensor | None = None,
    ) -> Tensor:
        """Sample videos with this model's sampler (:meth:`sample_latents`).

        Args:
            prompts: one prompt per video.
            seeds: one seed per video (default ``0 .. n-1``); the same seed gives the same video.
            num_inference_steps: overrides the module default.
            guidance_scale: overrides the module default.
            return_latents: return final latents instead of decoded pixels.
            sampler: ``"pipeline"`` (default: the backbone's diffusers scheduler, as a user deploys the model),
                ``"euler"`` (the Euler ODE of training rollouts) or None (the module's default); a few-step student
                always uses its own sampler.
            images: image-to-video: one conditioning image per prompt ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            Pixel videos ``[B, T, C, H, W]`` in ``[0, 1]`` (or latents ``[B, C, T', H', W']``).
        """
        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; expected one seed per prompt")
        was_training = self.training
        self.eval()
        try:
            cond = self.with_images(self.backbone.encode_prompts(prompts), images)
            hp = self.hparams
            shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
            noise, generators = seeded_noise(shape, seeds, self.device)  # a sampler's draws follow each seed
            latents = self.sample_latents(noise, cond, num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale, generator=generators, sampler=sampler)
            return latents if return_latents else self.backbone.decode_latents(latents)
        finally:
            self.train(was_training)


def guarded_scores(reward: nn.Module, videos: Tensor, prompts: list[str], who: str,
                   consequence: str, fps: float | None = None,
                   references: Tensor | None = None) -> dict[str, Tensor] | None:
    """``reward``'s scores of ``videos``, detached, in float32, with NaN for the samples it cannot score; None, and a
    warning ``"{who}: the reward raised ...; {consequence}"``, if the reward raises: a failing judge must never crash a
    run or reach the weights. The objectives that score their own samples (GRPO, DiffusionNFT, online DPO) share it.
    ``fps`` is the videos' frame rate (the generator's), for rewards that sample frames by time; ``references`` their
    conditioning images (image-to-video), for rewards that compare against one."""
    try:
        try:
            references = None if references is None else references.to(videos.device)
            scores = reward(videos, prompts, references=references, fps=fps)
        except FloatingPointError:  # some samples scored NaN (the checked call refuses them): keep the finite ones
            scores = reward.forward(videos, prompts, references, **reward.fps_kwargs(fps))
    except Exception as err:
        rank_zero_warn(f"{who}: the reward raised {type(err).__name__}: {err}; {consequence}")
        return None
    return {k: v.detach().float() for k, v in scores.items()}


def _finite_gradients(optimizer) -> bool:
    """Whether every gradient of ``optimizer``'s parameters is finite (this rank's shards under FSDP)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
