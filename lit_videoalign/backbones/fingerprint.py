"""A cheap fingerprint of a backbone's frozen base, so a checkpoint that leaves the base out can check on resume that
the base it is put back on is the one it was trained on.

Under LoRA a checkpoint holds only what trains (:meth:`~lit_videoalign.objectives.base.AlignmentModule.state_dict`);
the base is loaded again from its pipeline. The fingerprint names the pipeline (path or Hub id, and the Hub commit
when the folder is a Hub snapshot) and hashes what defines its weights without reading them whole: the text of every
config and tokenizer file, and for each weight file its name, size, header (safetensors: every tensor's name, dtype,
shape and offsets) and three 64 KiB samples of its data (start, middle, end). Reading a 14B model's index costs a few
megabytes; two fine-tunes of one architecture, whose headers are identical, still differ in the sampled bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from torch import nn

from lit_videoalign.errors import UsageError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_SAMPLE = 64 * 1024  # bytes read at each of three places of a weight file


def _hub_revision(root: Path) -> str | None:
    """The commit of a Hub cache snapshot (``.../snapshots/<commit>``), None for any other folder."""
    return root.name if root.parent.name == "snapshots" and len(root.name) == 40 else None


def _weight_entry(path: Path, digest: hashlib._Hash) -> None:
    """Hash one weight file's size, header and three data samples into ``digest``."""
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with path.open("rb") as f:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            start = 8 + min(header_len, size - 8)
            digest.update(f.read(start - 8))  # the JSON header: names, dtypes, shapes, offsets
        for offset in sorted({start, max(start, (start + size) // 2 - _SAMPLE // 2), max(start, size - _SAMPLE)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))


def pipeline_fingerprint(root: str | Path, source: str | None = None) -> dict[str, str | None]:
    """The fingerprint of the diffusers pipeline folder ``root``: ``{"source", "revision", "configs", "weights"}``,
    the last two 16-hex-digit hashes over the folders ``model_index.json`` lists (and ``model_index.json`` itself).

    Args:
        root: the local pipeline folder (a Hub id resolved to its snapshot).
        source: how the config names it (``builtin:...``, a path or a Hub id); defaults to ``root``.
    """
    root = Path(root)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline folder: it has no model_index.json")
    index = json.loads(index_file.read_text())
    folders = sorted(k for k, v in index.items() if isinstance(v, list) and v and v[0] and (root / k).is_dir())
    configs, weights = hashlib.sha256(index_file.read_bytes()), hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in (root / folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
            name = path.relative_to(root).as_posix()
            if path.suffix in _WEIGHT_SUFFIXES:
                weights.update(f"{name}\0".encode())
                _weight_entry(path, weights)
            else:
                configs.update(f"{name}\0".encode())
                configs.update(path.read_bytes())
    return {"source": source or str(root), "revision": _hub_revision(root), "configs": configs.hexdigest()[:16],
            "weights": weights.hexdigest()[:16]}


def module_fingerprint(module: nn.Module, source: str) -> dict[str, str | None]:
    """A fingerprint for a backbone with no pipeline folder: its class, and every tensor's name, dtype and shape."""
    layout = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        layout.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    return {"source": source, "revision": None, "configs": layout.hexdigest()[:16], "weights": None}


def backbone_fingerprint(backbone: nn.Module) -> dict[str, str | None]:
    """The fingerprint of ``backbone``'s frozen base: of its pipeline folder when it was loaded from one."""
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone

    if isinstance(backbone, DiffusersVideoBackbone):  # it keeps the folder it was loaded from
        return pipeline_fingerprint(backbone._root, backbone.pretrained_model_name_or_path)
    return module_fingerprint(backbone, type(backbone).__name__)


def describe(fingerprint: dict) -> str:
    """``source@revision (configs XXXX, weights YYYY)`` for messages."""
    fp = fingerprint
    at = f"@{fp['revision']}" if fp.get("revision") else ""
    return f"{fp.get('source')}{at} (configs {fp.get('configs')}, weights {fp.get('weights')})"


def check_fingerprint(saved: dict | None, current: dict, checkpoint: str) -> None:
    """Refuse to put a checkpoint's trained weights on another base than the one it was trained on.

    Only the hashes are compared: the same pipeline moved to another folder or cache still matches. ``saved=None``
    (a checkpoint with the whole model in it, or written before fingerprints) is accepted.

    Raises:
        UsageError: naming both fingerprints and the checkpoint.
    """
    if saved is None:
        return
    if (saved.get("configs"), saved.get("weights")) != (current.get("configs"), current.get("weights")):
        raise UsageError(f"{checkpoint} holds only the trained weights of a model whose frozen base was "
                         f"{describe(saved)}, but this model's base is {describe(current)}; load the base it was "
                         "trained on (the config's backbone pretrained_model_name_or_path and revision)")
