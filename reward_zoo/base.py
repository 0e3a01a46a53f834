"""``RewardModel``: the base class of every reward in the zoo.

A reward maps pixel videos ``[B, T, C, H, W]`` in ``[0, 1]`` (plus optional prompts and references) to a dict of
per-video scores ``{dimension: Tensor[B]}`` that always holds ``"overall"``. The base class owns everything that is
the same for every reward, so a family file only writes ``forward``:

- **input checks** in ``__call__`` (rank, channels, dtype, range, NaN, frame count, resolution, prompts and
  references present and batch-aligned) before ``forward`` runs;
- **score checks** after ``forward`` (exactly the declared dimensions plus ``"overall"``, each ``Tensor[B]``,
  no NaN or infinity, naming the offending dimension);
- **Hub I/O** through ``PyTorchModelHubMixin``: ``config.json`` is exactly the init arguments (the same dictionary
  as the YAML ``init_args``), weights are ``model.safetensors`` loaded with strict key and shape checks, and the
  model card records the reward class so ``create_reward("hf-hub:org/repo")`` knows what to build.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import is_jsonable
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lit_videoalign.errors import nearest
from lit_videoalign.video_io import check_video

METRICS_NAME = "metrics.json"  # held-out accuracies of a trained reward, beside its weights
# Keyword arguments of ``from_pretrained`` itself; an init argument of the same name would be swallowed by it.
HUB_LOADING_ARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "map_location",
                    "proxies", "resume_download")


class RewardModel(nn.Module, PyTorchModelHubMixin, library_name="reward_zoo", tags=["reward-model", "video"]):
    """A video reward: ``reward(videos, prompts=None, references=None, fps=None) -> {dimension: Tensor[B]}``.

    Subclasses set the class attributes below and implement ``forward`` with the same signature as ``__call__``.
    ``fps`` is the videos' frame rate (a tensor carries none): rewards that sample frames by time use it (and raise
    without it, see :meth:`require_fps`); the others accept and ignore it.
    Call the module (``reward(videos, prompts)``), not ``forward``, so the checks run. Every ``__init__`` argument
    must be JSON-serialisable (numbers, strings, booleans, ``None``, lists and dicts of those): the init arguments
    are the Hub ``config.json`` and the YAML ``init_args``.

    Attributes:
        dimensions: named scores ``forward`` returns besides ``"overall"``.
        differentiable: gradients flow from the scores to the input videos.
        requires_prompts: ``prompts`` must be given (text-alignment rewards).
        requires_references: ``references`` must be given (identity rewards).
        input_frames: the exact number of frames the reward expects, or None for any.
        input_size: the exact ``(height, width)`` the reward expects, or None for any.
        min_frames: the fewest frames the reward can score (e.g. 3 for a second temporal difference).
        license: licence of the reward's code and weights (Hub licence id), written to the model card.
        family: the reward family (``physics``, ``temporal``, ...); ``register_reward`` fills it from the module.
        score_ranges: ``{dimension: (low, high)}`` for each dimension and ``"overall"``, the closed range its scores
            lie in; None for an unbounded side (a logit is ``(None, None)``), a dimension left out has an unknown range.
        expected_fps: frame rate (frames per second) the reward was trained or tuned for (its time constants assume
            it), or None when its scores do not depend on the frame rate.
        expected_resolution: ``(height, width)`` the reward was trained or designed at (other sizes are resized to
            it), or None for any; an instance may refine it from its config (e.g. ``frame_size``) with a property.
        metrics: held-out evaluation of a trained reward (the ``metrics.json`` of its checkpoint: ``{"val": ...,
            "test": ...}`` as ``RewardTraining`` writes it), or None; loaded and saved with the checkpoint.

    The model card's YAML header carries these facts (``dimensions``, ``score_ranges``, ``differentiable``,
    ``expected_fps``, ``expected_resolution``, ``requires_prompts``, ``requires_references``, ``min_frames``) and,
    when ``metrics`` are known, the accuracies as a ``model-index`` block (:meth:`card_data`).
    """

    dimensions: ClassVar[tuple[str, ...]] = ()
    differentiable: ClassVar[bool] = False
    requires_prompts: ClassVar[bool] = False
    requires_references: ClassVar[bool] = False
    input_frames: int | None = None
    input_size: tuple[int, int] | None = None
    min_frames: int = 1
    license: ClassVar[str | None] = None
    family: ClassVar[str | None] = None
    score_ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    expected_fps: ClassVar[float | None] = None
    expected_resolution: ClassVar[tuple[int, int] | None] = None
    metrics: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        """Check the init defaults are JSON-serialisable and record the class in the Hub model-card metadata."""
        super().__init_subclass__(**kwargs)
        reserved = sorted(set(cls._hub_mixin_init_parameters) & set(HUB_LOADING_ARGS))
        if reserved:
            raise TypeError(f"{cls.__qualname__}.__init__ uses {reserved}, which from_pretrained takes for Hub "
                            f"loading; rename them (e.g. 'model_revision')")
        for param in cls._hub_mixin_init_parameters.values():
            if param.default is not inspect.Parameter.empty and not is_jsonable(param.default):
                raise TypeError(f"{cls.__qualname__}.__init__ default for {param.name!r} must be JSON-serialisable, "
                                f"got {type(param.default).__name__}")
        card = cls._hub_mixin_info.model_card_data
        card.reward_class = f"{cls.__module__}.{cls.__qualname__}"
        if cls.license is not None:
            card.license = cls.license

    def __new__(cls, *args, **kwargs):
        """Record the init arguments as the config, refusing any that ``config.json`` could not hold."""
        instance = super().__new__(cls, *args, **kwargs)
        names = [name for name in cls._hub_mixin_init_parameters if name != "self"]
        passed = {**dict(zip(names, args)), **kwargs}
        config = dict(cls._hub_mixin_jsonable_default_values)
        for key, value in passed.items():
            value = cls._encode_init_arg(key, value)
            if not is_jsonable(value):
                raise TypeError(f"{cls.__qualname__} init argument {key!r} must be JSON-serialisable (it becomes "
                                f"config.json and the YAML init_args), got {type(value).__name__}")
            config[key] = value
        instance._hub_mixin_config = json.loads(json.dumps(config))  # exactly what config.json will hold
        return instance

    @classmethod
    def _encode_init_arg(cls, name: str, value: Any) -> Any:
        """Hook for subclasses whose init takes objects with a JSON form (``CompositeReward`` takes rewards)."""
        return value

    @property
    def config(self) -> dict[str, Any]:
        """The init arguments: what ``save_pretrained`` writes to ``config.json`` (a copy, safe to edit)."""
        return copy.deepcopy(self._hub_mixin_config)

    # -- checks ---------------------------------------------------------------------------------------------
    def __call__(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                 fps: float | None = None) -> dict[str, Tensor]:
        """Check the inputs (``fps``: the videos' frame rate, a positive number or None), run ``forward``, check the
        scores."""
        fps = check_fps(fps, type(self).__name__)
        self.check_inputs(videos, prompts, references)
        scores = super().__call__(videos, prompts, references, **self.fps_kwargs(fps))
        self.check_scores(scores, batch_size=videos.shape[0])
        return scores

    def fps_kwargs(self, fps: float | None) -> dict[str, float]:
        """``{"fps": fps}`` if ``forward`` takes an ``fps`` argument, else ``{}`` (a reward written before rewards
        knew time ignores it). Also for callers of ``forward`` itself, e.g. ``guarded_scores``."""
        params = inspect.signature(type(self).forward).parameters
        takes = "fps" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        return {"fps": fps} if takes else {}

    def require_fps(self, fps: float | None, expected: float | None = None) -> float:
        """``fps``, or a one-line error naming this reward and the frame rate its checkpoint samples at: for rewards
        that sample frames by time."""
        if fps is None:
            at = f" (its checkpoint samples frames at {expected:g} fps)" if expected is not None else ""
            raise ValueError(f"{type(self).__name__} samples frames by time and needs the videos' frame rate{at}; "
                             f"pass fps=<frames per second of the videos>")
        return fps

    def check_inputs(self, videos: Tensor, prompts: list[str] | None, references: Tensor | None) -> None:
        """Raise a clear error unless the inputs are what ``forward`` is promised."""
        name = type(self).__name__
        check_video(videos.detach() if isinstance(videos, Tensor) else videos, batched=True, name="videos")
        b, t, _, h, w = videos.shape
        if b == 0:
            raise ValueError(f"{name} got an empty batch of videos, shape {tuple(videos.shape)}")
        if t < self.min_frames:
            raise ValueError(f"{name} needs at least {self.min_frames} frames, got videos of shape "
                             f"{tuple(videos.shape)}")
        if self.input_frames is not None and t != self.input_frames:
            raise ValueError(f"{name} expects {self.input_frames} frames, got {t} (videos shape {tuple(videos.shape)})")
        if self.input_size is not None and (h, w) != tuple(self.input_size):
            raise ValueError(f"{name} expects frames of size {tuple(self.input_size)} (height, width), got {(h, w)}")
        if prompts is None:
            if self.requires_prompts:
                raise ValueError(f"{name} scores text alignment and needs prompts, got prompts=None")
        else:
            if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
                raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
            if len(prompts) != b:
                raise ValueError(f"batch size mismatch: videos has {b} items but prompts has {len(prompts)}")
        if references is None:
            if self.requires_references:
                raise ValueError(f"{name} compares against references and needs them, got references=None")
        else:
            if not isinstance(references, Tensor):
                raise TypeError(f"references must be a torch.Tensor, got {type(references).__name__}")
            if references.ndim == 0 or references.shape[0] != b:
                raise ValueError(f"batch size mismatch: videos has {b} items but references has shape "
                                 f"{tuple(references.shape)}")
            if references.ndim == 5:
                check_video(references.detach(), batched=True, name="references")
            elif references.ndim == 4:  # images [B, C, H, W] have the layout of one video [T, C, H, W]
                check_video(references.detach(), batched=False, name="references (images [B, C, H, W])")
            else:
                raise ValueError(f"references must be images [B, C, H, W] or videos [B, T, C, H, W], "
                                 f"got shape {tuple(references.shape)}")

    def check_scores(self, scores: dict[str, Tensor], batch_size: int) -> None:
        """Raise unless ``scores`` holds exactly the declared dimensions plus ``"overall"``, each finite ``[B]``."""
        name = type(self).__name__
        if not isinstance(scores, dict):
            raise TypeError(f"{name}.forward must return a dict of scores, got {type(scores).__name__}")
        expected = set(self.dimensions) | {"overall"}
        if set(scores) != expected:
            raise KeyError(f"{name}.forward returned dimensions {sorted(scores)}, expected {sorted(expected)} "
                           f"(the declared dimensions plus 'overall')")
        for key, value in scores.items():
            if not isinstance(value, Tensor) or value.shape != (batch_size,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} score {key!r} must be a Tensor of shape ({batch_size},), got {shape}")
            bad = ~torch.isfinite(value)
            if bad.any():
                raise FloatingPointError(f"{name} produced NaN or infinite scores for dimension {key!r} "
                                         f"at batch items {bad.nonzero().flatten().tolist()}")

    # -- Hub I/O --------------------------------------------------------------------------------------------
    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", **model_kwargs) -> RewardModel:
        """Check ``config.json`` names only init arguments, build the reward from it and load ``model.safetensors``
        strictly (no pickle fallback)."""
        hub = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download,
               "local_files_only": local_files_only, "token": token}

        def fetch(name: str) -> str:
            if os.path.isdir(model_id):
                return os.path.join(model_id, name)
            return hf_hub_download(model_id, name, **hub)

        cls.check_config_file(fetch(constants.CONFIG_NAME))
        model = cls(**model_kwargs)
        weights = fetch(constants.SAFETENSORS_SINGLE_FILE)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no {constants.SAFETENSORS_SINGLE_FILE} in {model_id}; reward checkpoints "
                                    f"are safetensors only")
        load_weights(model, weights, map_location=map_location)
        model.metrics = _read_metrics(model_id, hub)
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        """``model.safetensors`` (the mixin's writer), and ``metrics.json`` when the reward has held-out metrics, so
        ``push_to_hub`` uploads them with the weights."""
        super()._save_pretrained(save_directory)
        if self.metrics:
            (Path(save_directory) / METRICS_NAME).write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")

    def card_data(self, metrics: dict[str, Any] | None = None, name: str | None = None,
                  dataset_name: str = "held-out preference pairs") -> ModelCardData:
        """The model card's YAML header: the class's Hub metadata, this reward's facts (dimensions, their ranges,
        differentiability, expected fps and resolution, required inputs) and, given ``metrics`` (default
        :attr:`metrics`), each split's pairwise accuracies per dimension as ``model-index`` results."""
        metrics = self.metrics if metrics is None else metrics
        dims = (*self.dimensions, "overall")
        data = self._hub_mixin_info.model_card_data.to_dict()
        data.update(
            dimensions=list(dims),
            score_ranges={d: list(self.score_ranges[d]) if d in self.score_ranges else None for d in dims},
            differentiable=bool(self.differentiable),
            expected_fps=None if self.expected_fps is None else float(self.expected_fps),
            expected_resolution=None if self.expected_resolution is None else list(self.expected_resolution),
            requires_prompts=bool(self.requires_prompts),
            requires_references=bool(self.requires_references),
            min_frames=int(self.min_frames),
        )
        results = []
        for split, label in (("val", "validation"), ("test", "test")):
            per_dim = ((metrics or {}).get(split) or {}).get("dimensions", {})
            for dim in sorted(per_dim, key=lambda d: (d not in dims, dims.index(d) if d in dims else d)):
                values = per_dim[dim]
                for key, what in (("acc", "pairwise accuracy (strict pairs)"), ("acc_ties", "accuracy with ties")):
                    if key in values:
                        results.append(EvalResult(
                            task_type="reward-modeling", task_name="video preference prediction",
                            dataset_type="preference-pairs", dataset_name=dataset_name, dataset_split=label,
                            metric_type="accuracy", metric_name=f"{dim} {what}", metric_value=float(values[key])))
        if results:
            data.update(model_name=name or type(self).__name__, eval_results=results)
        return ModelCardData(**data)

    def generate_model_card(self, *args, metrics: dict[str, Any] | None = None, name: str | None = None,
                            **kwargs) -> ModelCard:
        """The mixin's card with :meth:`card_data` as its YAML header (``metrics`` default :attr:`metrics`, ``name``
        the model's name in ``model-index``, default the class name)."""
        card = super().generate_model_card(*args, **kwargs)
        card.data = self.card_data(metrics, name=name)
        return card

    @classmethod
    def check_config_file(cls, path: str | os.PathLike) -> None:
        """Refuse a ``config.json`` with keys that are not init arguments (a typo such as ``wdith`` would otherwise be
        ignored silently), naming each and the nearest valid name."""
        if not os.path.isfile(path):
            return
        try:
            config = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        params = cls._hub_mixin_init_parameters
        if not isinstance(config, dict) or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        valid = [name for name in params if name != "self"]
        unknown = [key for key in config if key not in params]
        if unknown:
            named = ", ".join(f"{key!r}{nearest(key, valid)}" for key in unknown)
            raise ValueError(f"{path} has keys that {cls.__qualname__} does not take: {named} "
                             f"(valid keys: {', '.join(valid)})")


def check_fps(fps: float | None, who: str = "reward") -> float | None:
    """``fps`` as a float, or None; a one-line error unless it is a positive finite number (or None)."""
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{who}: fps must be a positive number of frames per second or None, got {fps!r}")
    return float(fps)


def _read_metrics(model_id: str, hub: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's ``metrics.json`` (folder or Hub repository), or None when it has none."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, METRICS_NAME)
        if not os.path.isfile(path):
            return None
    else:
        try:
            path = hf_hub_download(model_id, METRICS_NAME, **hub)
        except EntryNotFoundError:  # not in the repository (or, offline, not in the cache): a reward without metrics
            return None
    try:
        metrics = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{METRICS_NAME} of {model_id} is not valid JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{METRICS_NAME} of {model_id} must hold a JSON object, got {type(metrics).__name__}")
    return metrics


def load_weights(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a safetensors file into ``model`` strictly: every key present, no extra key, every shape equal.

    Raises:
        ValueError: naming the first missing, unexpected or mis-shaped key.
    """
    try:
        state = load_file(str(path), device=str(map_location))
    except SafetensorError as err:  # e.g. a pickle saved under a .safetensors name: never unpickled
        raise ValueError(f"{path} is not a valid safetensors file ({err}); reward weights are read from safetensors "
                         "only (save them with save_pretrained or safetensors.torch.save_file)") from None
    load_state_strict(model, state, f"checkpoint {path} does not match {type(model).__name__}")
    return model


def load_state_strict(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly: every key present, no extra key, every shape equal; else one line
    ``"{what}: ..."`` naming the first missing, unexpected or mis-shaped key. Every reward loader goes through it."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{what}: {first} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{what}: key {key!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                             f"{tuple(expected[key].shape)} in the model")
    model.load_state_dict(state, strict=True)
