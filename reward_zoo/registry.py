"""Reward registry and factory, timm-style: ``register_reward``, ``create_reward``, ``list_rewards``,
``get_reward_class`` and ``reward_info``.

A family file (``physics.py``, ``temporal.py``, ...) registers each reward with one decorator line; the family is
the module's name. The family modules listed in ``FAMILY_MODULES`` are imported the first time the registry is
queried, so ``create_reward("newton")`` works after a bare ``import reward_zoo`` without importing every heavy
dependency up front.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import ModelCard, constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from lit_videoalign.errors import hub_offline_error, shorten
from reward_zoo.base import RewardModel

# Reward family modules of this package, imported on the first registry query. A new family adds its name here.
FAMILY_MODULES = ("physics", "temporal", "identity", "quality", "alignment", "aesthetic", "pickscore", "hpsv2",
                  "frame", "videoreward", "vlm_judge", "remote")
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
HUB_PREFIX = "hf-hub:"

_REWARDS: dict[str, Callable[..., RewardModel]] = {}
_FAMILIES: dict[str, str] = {}
_imported = False


def register_reward(name: str) -> Callable:
    """Decorator registering a reward class (or a factory function returning one) under ``name``.

    The family is taken from the defining module's name (``reward_zoo.physics`` -> ``"physics"``) and, for a
    class, written to its ``family`` attribute.
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith(HUB_PREFIX):
        raise ValueError(f"reward name must be a non-empty string without '/' or {HUB_PREFIX!r}, got {name!r}")

    def decorator(fn: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REWARDS[name].__module__}."
                             f"{_REWARDS[name].__qualname__}")
        if isinstance(fn, type) and not issubclass(fn, RewardModel):
            raise TypeError(f"register_reward({name!r}) decorates {fn.__qualname__}, which is not a RewardModel")
        family = fn.__module__.rsplit(".", 1)[-1]
        if isinstance(fn, type):
            fn.family = family
        _REWARDS[name] = fn
        _FAMILIES[name] = family
        return fn

    return decorator


def _import_families() -> None:
    """Import this package's family modules once, so their ``register_reward`` lines have run."""
    global _imported
    if _imported:
        return
    for module in FAMILY_MODULES:
        if importlib.util.find_spec(f"reward_zoo.{module}") is not None:
            importlib.import_module(f"reward_zoo.{module}")
    _imported = True


def list_rewards(family: str | None = None) -> list[str]:
    """Sorted names of the registered rewards, optionally of one family only.

    Raises:
        ValueError: ``family`` names no registered family (the message lists the known ones).
    """
    _import_families()
    if family is None:
        return sorted(_REWARDS)
    families = sorted(set(_FAMILIES.values()))
    if family not in families:
        raise ValueError(f"unknown reward family {family!r}; known families: {families}")
    return sorted(name for name, fam in _FAMILIES.items() if fam == family)


def _unknown_reward(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_REWARDS), n=3, cutoff=0.5)
    hint = f"did you mean {close}? " if close else ""
    return ValueError(f"unknown reward {shorten(name)}; {hint}available: {sorted(_REWARDS)} "
                      f"(or pass 'hf-hub:org/repo' or a local checkpoint folder)")


def is_reward(name: str) -> bool:
    """Whether ``name`` is a registered reward (timm's ``is_model``)."""
    _import_families()
    return name in _REWARDS


def get_reward_class(name: str) -> Callable[..., RewardModel]:
    """The class (or factory function) registered under ``name`` (timm's ``model_entrypoint``).

    Raises:
        ValueError: unknown name (the message lists close matches).
    """
    _import_families()
    if name not in _REWARDS:
        raise _unknown_reward(name)
    return _REWARDS[name]


def reward_info(name: str) -> dict:
    """What the zoo knows about a registered reward without building it, as a JSON-serialisable dict.

    Keys: ``name``, ``family``, ``dimensions`` (without ``"overall"``), ``differentiable``, ``requires_prompts``,
    ``requires_references``, ``min_frames``, ``license``, ``paper_url`` and ``pretrained`` (whether weights ship
    under ``reward_zoo/pretrained/<name>/``; their model card's licence then wins). A reward registered by a factory
    function reveals only its name, family and shipped weights; the other entries are None.

    Raises:
        ValueError: unknown name (the message lists close matches).
    """
    entry = get_reward_class(name)
    is_class = isinstance(entry, type)
    folder = PRETRAINED_DIR / name
    shipped = (folder / constants.CONFIG_NAME).is_file() and (folder / constants.SAFETENSORS_SINGLE_FILE).is_file()
    licence = entry.license if is_class else None
    if shipped and (folder / constants.REPOCARD_NAME).is_file():
        licence = ModelCard.load(folder / constants.REPOCARD_NAME).data.to_dict().get("license", licence)
    attrs = ("dimensions", "differentiable", "requires_prompts", "requires_references", "min_frames")
    values = {a: getattr(entry, a, None) if is_class else None for a in attrs}
    values = {a: None if isinstance(v, property) else v for a, v in values.items()}  # known per instance only
    if values["dimensions"] is not None:
        values["dimensions"] = list(values["dimensions"])
    info = {"name": name, "family": _FAMILIES[name], **values}
    paper = entry._hub_mixin_info.paper_url if is_class else None
    return {**info, "license": licence, "paper_url": paper, "pretrained": shipped}


def create_reward(name_or_hub_id: str, pretrained: bool = False, **kwargs) -> RewardModel:
    """Build a reward from the registry, a Hub repository or a local folder.

    Args:
        name_or_hub_id: a registered name (``"newton"``), ``"hf-hub:org/repo"``, or a folder written by
            ``save_pretrained`` (``config.json``, ``model.safetensors``, ``README.md``).
        pretrained: for a registered name, load the weights shipped under ``reward_zoo/pretrained/<name>/``.
            Hub ids and folders always load their weights.
        **kwargs: init arguments; ``None`` values are dropped (timm-style), so a YAML ``null`` means "default".
            For a checkpoint they override its ``config.json``.

    Raises:
        ValueError: unknown name (the message lists close matches).
        FileNotFoundError: ``pretrained=True`` but no weights ship for that name.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name_or_hub_id.startswith(HUB_PREFIX):
        return load_reward(name_or_hub_id[len(HUB_PREFIX):], **kwargs)
    if os.path.isdir(name_or_hub_id):
        return load_reward(name_or_hub_id, **kwargs)
    factory = get_reward_class(name_or_hub_id)
    if pretrained:
        folder = PRETRAINED_DIR / name_or_hub_id
        if not (folder / constants.CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no pretrained weights ship for reward {name_or_hub_id!r} (looked for "
                                    f"{folder / constants.CONFIG_NAME}); use pretrained=False, or load a checkpoint "
                                    f"with create_reward('hf-hub:org/repo') or a local folder")
        return load_reward(str(folder), **kwargs)
    reward = factory(**kwargs)
    if not isinstance(reward, RewardModel):
        raise TypeError(f"registered reward {name_or_hub_id!r} built a {type(reward).__name__}, not a RewardModel")
    return reward.eval()  # rewards are judges: no dropout, frozen norms


def load_reward(path_or_repo_id: str, **kwargs) -> RewardModel:
    """Load a checkpoint folder or Hub repository written by ``RewardModel.save_pretrained``.

    The reward class is read from the model card (``reward_class``) and must be an already-imported
    ``RewardModel`` subclass: nothing is imported on the checkpoint's say-so.
    """
    if os.path.isdir(path_or_repo_id):
        card_file = os.path.join(path_or_repo_id, constants.REPOCARD_NAME)
        if not os.path.isfile(card_file):
            raise FileNotFoundError(f"no {constants.REPOCARD_NAME} in {path_or_repo_id}; it names the reward class")
    else:
        hub_args = ("revision", "cache_dir", "force_download", "local_files_only", "token")
        try:
            card_file = hf_hub_download(path_or_repo_id, constants.REPOCARD_NAME,
                                        **{k: kwargs[k] for k in hub_args if k in kwargs})
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
            raise hub_offline_error(path_or_repo_id, "reward") from err
    class_path = ModelCard.load(card_file).data.to_dict().get("reward_class")
    if class_path is None:
        raise ValueError(f"the model card of {path_or_repo_id} has no 'reward_class' entry; was it written by "
                         f"RewardModel.save_pretrained?")
    try:
        return reward_class(class_path).from_pretrained(path_or_repo_id, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:  # the card was cached, the weights are not
        raise hub_offline_error(path_or_repo_id, "reward") from err


def reward_class(class_path: str) -> type[RewardModel]:
    """The imported ``RewardModel`` subclass whose ``module.QualName`` is ``class_path``."""
    _import_families()
    known, stack = {}, [RewardModel]
    while stack:
        cls = stack.pop()
        known[f"{cls.__module__}.{cls.__qualname__}"] = cls
        stack.extend(cls.__subclasses__())
    if class_path not in known:
        close = difflib.get_close_matches(class_path, list(known), n=3, cutoff=0.5)
        raise ValueError(f"unknown reward class {class_path!r}: import the module defining it first"
                       + (f"; close matches: {close}" if close else ""))
    return known[class_path]
