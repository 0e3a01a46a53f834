"""Finding and loading the components of a diffusers pipeline folder, for :mod:`lit_videoalign.backbones.diffusers`.

A pipeline is named as ``builtin:NAME`` (shipped in ``lit_videoalign/pretrained/``), a local folder or a Hub id
(:func:`resolve_pretrained_path`). Only classes from diffusers and transformers are instantiated
(:func:`_component_class`); the denoiser may be loaded in 4 bits (:func:`_load_quantized`); the sampler's shift comes
from the scheduler config (:func:`_scheduler_shift`), and the scheduler itself from :func:`load_scheduler`.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from lit_videoalign.errors import hub_offline_error

ALLOWED_LIBRARIES = ("diffusers", "transformers")
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "pretrained"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    patterns = ["model_index.json", "transformer/*", "vae/*", "scheduler/*", "text_encoder/*", "tokenizer/*",
                "text_encoder_2/*", "tokenizer_2/*", "image_encoder/*", "image_processor/*", "feature_extractor/*",
                "connectors/*", "audio_vae/*", "vocoder/*", "guider/*"]
    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise hub_offline_error(name_or_path, "pipeline") from err


def _component_class(library: str, class_name: str) -> type:
    if library not in ALLOWED_LIBRARIES:
        raise ValueError(f"component class {library}.{class_name} is not allowed; only {ALLOWED_LIBRARIES} are loaded")
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ValueError(f"{library} has no class {class_name!r} (is the installed {library} too old?)")
    return getattr(module, class_name)


def component_classes(root: Path, index: dict, family: str, components: tuple[str, ...]) -> dict[str, type]:
    """The classes of a pipeline's ``components`` and, when ``model_index.json`` lists one, its ``"vae"``, checked
    before any is loaded: every component is listed, every class is allowed, and every folder exists."""
    missing = [k for k in components if not (index.get(k) or [None])[0]]
    if missing:
        raise ValueError(f"pipeline {root} lacks required components {missing} in model_index.json "
                         f"(a {family} pipeline needs {list(components)})")
    vae_entry = index.get("vae") or [None, None]
    names = [*components, "vae"] if vae_entry[0] else list(components)
    classes = {name: _component_class(*index[name]) for name in names}  # refuse bad classes before loading any
    absent = [f"{name}/" for name in names if not (root / name / "config.json").is_file()
              and not (name.startswith("tokenizer") and (root / name).is_dir())]
    if absent:
        raise FileNotFoundError(f"pipeline {root} has no {' or '.join(absent)}: model_index.json lists it, and a "
                                f"{family} pipeline needs the folders {[f'{n}/' for n in names]}, each "
                                "with its config and weights")
    return classes


# What pipelines call the image encoder's processor: Wan 2.1 I2V ``image_processor``, HunyuanVideo 1.5 I2V (and most
# diffusers pipelines) ``feature_extractor``.
IMAGE_PROCESSOR_NAMES = ("image_processor", "feature_extractor")


def image_processor_name(index: dict) -> str | None:
    """The ``model_index.json`` entry of the image encoder's processor (one of :data:`IMAGE_PROCESSOR_NAMES`), or None
    when the pipeline lists none."""
    listed = [name for name in IMAGE_PROCESSOR_NAMES if (index.get(name) or [None])[0]]
    return listed[0] if listed else None


def load_image_encoder(root: Path, index: dict, dtype: torch.dtype) -> tuple[nn.Module | None, object | None]:
    """The pipeline's image encoder and its image processor (``image_encoder/`` and ``image_processor/`` as Wan 2.1
    I2V ships a CLIP vision tower, or ``feature_extractor/`` as HunyuanVideo 1.5 I2V ships SigLIP's), frozen, or
    ``(None, None)`` when ``model_index.json`` lists no image encoder."""
    if not (index.get("image_encoder") or [None])[0]:
        return None, None
    processor = image_processor_name(index)
    if processor is None:
        raise ValueError(f"pipeline {root} lists an image_encoder but none of {list(IMAGE_PROCESSOR_NAMES)} in "
                         "model_index.json; the encoder's input is made by that processor")
    classes = {name: _component_class(*index[name]) for name in ("image_encoder", processor)}
    for name, config in (("image_encoder", "config.json"), (processor, "preprocessor_config.json")):
        if not (root / name / config).is_file():
            raise FileNotFoundError(f"pipeline {root} has no {name}/{config}: model_index.json lists {name}")
    encoder = classes["image_encoder"].from_pretrained(root, subfolder="image_encoder", torch_dtype=dtype)
    encoder.requires_grad_(False).eval()
    return encoder, classes[processor].from_pretrained(root, subfolder=processor)


def load_scheduler(root: Path, index: dict):
    """The pipeline's own diffusers scheduler (``scheduler/`` as ``model_index.json`` names it), or None when the
    pipeline lists none. Only a diffusers ``SchedulerMixin`` class is instantiated."""
    entry = index.get("scheduler") or [None, None]
    if not entry[0]:
        return None
    if entry[0] != "diffusers":
        raise ValueError(f"scheduler class {entry[0]}.{entry[1]} is not allowed; only diffusers schedulers are loaded")
    from diffusers import SchedulerMixin

    cls = _component_class(*entry)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"model_index.json names {entry[1]!r} as the scheduler, which is not a diffusers scheduler")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"pipeline {root} has no scheduler/scheduler_config.json: model_index.json lists "
                                f"the scheduler {entry[1]}")
    return cls.from_pretrained(root, subfolder="scheduler")


def _scheduler_shift(root: Path) -> float:
    """The sigma shift a pipeline was trained for, from its scheduler config (``shift`` or Wan's ``flow_shift``)."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return 1.0
    config = json.loads(path.read_text())
    if config.get("use_dynamic_shifting"):
        return 1.0  # resolution-dependent shift (LTX, Flux); the sampler's shift is set explicitly in the config
    return float(config.get("flow_shift") or config.get("shift") or 1.0)


_QUANTIZATIONS = ("nf4", "fp4")


def _load_quantized(transformer_cls: type, root: Path, quant_type: str, dtype: torch.dtype,
                    subfolder: str = "transformer") -> nn.Module:
    """Load the transformer with its linear layers in 4 bits (bitsandbytes through diffusers' quantizer)."""
    from diffusers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=True)
    # One whole copy per process on its own device (Lightning starts one process per device, LOCAL_RANK each).
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model = transformer_cls.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype,
                                            quantization_config=config, device_map={"": device})
    for layer in model.modules():
        # bitsandbytes >= 0.49 repacks 4-bit weights for its CPU inference kernel on the first eval-mode call; the
        # repacked layout then breaks training steps (in-place bias add on a leaf view). Keep the training layout.
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model


def resolve_device(device: str | None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
