"""Diffusers video pipelines as backbones: Wan 2.1/2.2 today; a family is one ``ModelFamily`` entry away.

Loading goes through the real ``from_pretrained`` of diffusers and transformers, component by component, from a
diffusers pipeline folder or Hub id (``model_index.json`` plus ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``). Only classes from diffusers and transformers are ever instantiated, weights are read from
safetensors, and no remote code runs.

A pipeline whose ``model_index.json`` has no VAE (``"vae": [null, null]``) is a **pixel-space** model: latents are
the video itself rescaled to ``[-1, 1]`` as ``[B, C, T, H, W]``. The shipped toy-world base is one.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_videoalign.backbones.base import Conditioning, VideoBackbone
from lit_videoalign.schedules.flow import _broadcast
from lit_videoalign.video_io import check_video

ALLOWED_LIBRARIES = ("diffusers", "transformers")
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "pretrained"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelFamily:
    """How one diffusers model family maps to the project's conventions.

    Attributes:
        name: short family name used in configs (``"wan"``).
        transformer_class: the diffusers transformer class name that identifies the family.
        max_sequence_length: default prompt length in tokens (the family's pipeline default).
        pad_embeds_with_zeros: zero the embeddings of padding tokens instead of passing a mask (Wan).
        lora_targets: default LoRA target module names.
    """

    name: str
    transformer_class: str
    max_sequence_length: int
    pad_embeds_with_zeros: bool
    lora_targets: tuple[str, ...]

    def call_transformer(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """Run the family's transformer on ``[B, C, T', H', W']`` latents with diffusers timesteps ``[B]``."""
        if self.name == "wan":
            return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                               return_dict=False)[0]
        raise NotImplementedError(f"model family {self.name!r} has no transformer call")


FAMILIES: dict[str, ModelFamily] = {
    "wan": ModelFamily("wan", "WanTransformer3DModel", 512, True, ("to_q", "to_k", "to_v", "to_out.0")),
}


def family_for(transformer_class: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.transformer_class == transformer_class:
            return family
    supported = {f.name: f.transformer_class for f in FAMILIES.values()}
    raise ValueError(f"transformer class {transformer_class!r} is not a supported family; supported: {supported}")


def resolve_pretrained_path(name_or_path: str, revision: str | None = None) -> Path:
    """Turn ``builtin:NAME``, a local folder or a Hub id into a local pipeline folder.

    Hub ids are fetched with ``huggingface_hub.snapshot_download`` (cached, honours ``HF_HUB_OFFLINE`` and
    ``revision``), restricted to the components this backbone loads.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"pretrained_model_name_or_path must be a non-empty string, got {name_or_path!r}")
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / name
        if not (path / "model_index.json").is_file():
            available = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "model_index.json").is_file()) \
                if BUILTIN_DIR.is_dir() else []
            raise FileNotFoundError(f"no built-in pipeline {name!r}; available: {available}")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: it has no model_index.json")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(
            f"pretrained path {name_or_path!r} is neither a pipeline folder nor a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"]
    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))


def _component_class(library: str, class_name: str) -> type:
    if library not in ALLOWED_LIBRARIES:
        raise ValueError(f"component class {library}.{class_name} is not allowed; only {ALLOWED_LIBRARIES} are loaded")
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ValueError(f"{library} has no class {class_name!r} (is the installed {library} too old?)")
    return getattr(module, class_name)


class DiffusersVideoBackbone(VideoBackbone):
    """A diffusers text-to-video pipeline as a :class:`VideoBackbone`.

    Everything but the denoiser is frozen and kept in eval mode.

    Args:
        pretrained_model_name_or_path: a pipeline folder, a Hub id (``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"``) or
            ``"builtin:toyworld-base"`` for a pipeline shipped with this package.
        revision: Hub revision (branch, tag or commit) to pin.
        max_sequence_length: prompt length in tokens; defaults to the family's (512 for Wan).
        torch_dtype: dtype of the denoiser weights (``"float32"``, ``"bfloat16"``, ``"float16"``).
        frozen_dtype: dtype of the frozen VAE and text encoder.
        reinit_denoiser: re-initialise the denoiser from its config (pretraining from scratch); uses the global seed.
        gradient_checkpointing: recompute transformer blocks in the backward pass.
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
    ) -> None:
        super().__init__()
        for key, value in (("torch_dtype", torch_dtype), ("frozen_dtype", frozen_dtype)):
            if value not in _DTYPES:
                raise ValueError(f"{key} must be one of {list(_DTYPES)}, got {value!r}")
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        root = resolve_pretrained_path(pretrained_model_name_or_path, revision)
        self._root = root
        index = json.loads((root / "model_index.json").read_text())
        self.model_index = index
        missing = [k for k in ("transformer", "text_encoder", "tokenizer") if not (index.get(k) or [None])[0]]
        if missing:
            raise ValueError(f"pipeline {root} lacks required components {missing} in model_index.json")

        dtype, frozen = _DTYPES[torch_dtype], _DTYPES[frozen_dtype]
        t_lib, t_cls = index["transformer"]
        self.family = family_for(t_cls)
        transformer_cls = _component_class(t_lib, t_cls)
        if reinit_denoiser:
            config = transformer_cls.load_config(root, subfolder="transformer")
            self.denoiser = transformer_cls.from_config(config)
            if dtype != torch.float32:
                self.denoiser = self.denoiser.to(dtype)
        else:
            self.denoiser = transformer_cls.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        self.default_lora_targets = self.family.lora_targets
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

        te_lib, te_cls = index["text_encoder"]
        self.text_encoder = _component_class(te_lib, te_cls).from_pretrained(
            root, subfolder="text_encoder", torch_dtype=frozen)
        tok_lib, tok_cls = index["tokenizer"]
        self.tokenizer = _component_class(tok_lib, tok_cls).from_pretrained(root, subfolder="tokenizer")
        vae_entry = index.get("vae") or [None, None]
        if vae_entry[0]:
            self.vae = _component_class(*vae_entry).from_pretrained(root, subfolder="vae", torch_dtype=frozen)
            self.vae.requires_grad_(False).eval()
        else:
            self.vae = None
        self.text_encoder.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length or self.family.max_sequence_length
        patch = self.denoiser.config.get("patch_size", (1, 1, 1))
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (1, patch, patch)

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    def train(self, mode: bool = True) -> DiffusersVideoBackbone:
        """Only the denoiser follows train mode; the frozen components stay in eval."""
        super().train(mode)
        self.text_encoder.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    # -- prompts --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Tokenise to ``max_sequence_length`` and run the frozen text encoder. Returns embeds ``(b, l, d)``."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; expected at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a string, got {bad[0]!r}")
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        embeds = self.text_encoder(ids, attention_mask=mask).last_hidden_state  # (b, l, d)
        embeds = embeds.to(self.denoiser.dtype)
        if self.family.pad_embeds_with_zeros:
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return Conditioning(prompt_embeds=embeds, prompt_mask=mask)

    # -- videos and latents ---------------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        pt, ph, pw = self.patch_size
        if self.vae is None:
            t, h, w, c = num_frames, height, width, self.denoiser.config.in_channels
        else:
            ft, fs = self.vae.config.get("scale_factor_temporal", 4), self.vae.config.get("scale_factor_spatial", 8)
            if (num_frames - 1) % ft:
                raise ValueError(f"num_frames must be 1 + {ft}k for this VAE, got {num_frames}")
            if height % fs or width % fs:
                raise ValueError(f"height and width must be multiples of {fs} for this VAE, got {height}x{width}")
            t, h, w, c = (num_frames - 1) // ft + 1, height // fs, width // fs, self.vae.config.z_dim
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size {t}x{h}x{w} for {num_frames}x{height}x{width} frames is not divisible by "
                             f"the transformer patch size {self.patch_size}")
        return (c, t, h, w)

    def _vae_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def encode_videos(self, videos: Tensor) -> Tensor:
        check_video(videos, batched=True, name="videos")
        x = videos.permute(0, 2, 1, 3, 4) * 2 - 1  # (b, c, t, h, w) in [-1, 1]
        self.latent_shape(videos.shape[1], videos.shape[3], videos.shape[4])
        if self.vae is None:
            return x.to(self.denoiser.dtype)
        with torch.no_grad():
            latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()  # deterministic: the posterior mean
            mean, std = self._vae_stats(latents)
            return ((latents - mean) / std).to(self.denoiser.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape [B, C, T', H', W'], got shape {tuple(latents.shape)}")
        if self.vae is None:
            x = latents.float()
        else:
            mean, std = self._vae_stats(latents.to(self.vae.dtype))
            x = self.vae.decode(latents.to(self.vae.dtype) * std + mean, return_dict=False)[0].float()
        # The decoder's range is [-1, 1] only approximately; map to [0, 1] the way diffusers' postprocessing does.
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()  # (b, t, c, h, w)

    # -- denoiser -------------------------------------------------------------------------------------------------
    def predict_velocity(self, latents: Tensor, sigma: float | Tensor, cond: Conditioning,
                         denoiser: nn.Module | None = None) -> Tensor:
        """Velocity ``noise - x0`` at ``(latents, sigma)``; the transformer sees ``timestep = sigma * 1000``.

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
        out = self.family.call_transformer(model, latents.to(model.dtype), timestep, cond.to(dtype=model.dtype))
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            denoiser.save_pretrained(tmp / "transformer", safe_serialization=True)
            self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            index = dict(self.model_index)
            index["transformer"] = ["diffusers", type(denoiser).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            for extra in ("scheduler",):
                src = self._root / extra
                if src.is_dir():
                    shutil.copytree(src, tmp / extra)
            if path.exists():
                backup = path.with_name(f".{path.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(path, backup)
                os.replace(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
