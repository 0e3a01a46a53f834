"""Video models seen through the project's conventions (``base.py``: the contract; ``diffusers.py``: Wan,
HunyuanVideo and LTX-Video through diffusers; ``loading.py``: pipeline folders, Hub ids, quantized loading;
``adapters.py``: named LoRA adapters). Names load lazily: importing this package loads neither diffusers nor peft.
"""

from lit_videoalign._exports import lazy_exports

_EXPORTS = {
    "VideoBackbone": "lit_videoalign.backbones.base",
    "Conditioning": "lit_videoalign.backbones.base",
    "DiffusersVideoBackbone": "lit_videoalign.backbones.diffusers",
    "ModelFamily": "lit_videoalign.backbones.diffusers",
    "WanFamily": "lit_videoalign.backbones.diffusers",
    "LTXFamily": "lit_videoalign.backbones.diffusers",
    "HunyuanVideoFamily": "lit_videoalign.backbones.diffusers",
    "family_for": "lit_videoalign.backbones.diffusers",
    "resolve_pretrained_path": "lit_videoalign.backbones.loading",
    "resolve_device": "lit_videoalign.backbones.loading",
    "AdapterRoles": "lit_videoalign.backbones.adapters",
    "add_named_adapter": "lit_videoalign.backbones.adapters",
    "checkpointing_off": "lit_videoalign.backbones.adapters",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
