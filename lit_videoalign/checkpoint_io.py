"""Checkpoints in and out: ``AtomicCheckpointIO`` writes a checkpoint to a temporary file beside it and renames it over
it, so a run killed (or out of disk space) in the middle of a save keeps its previous checkpoint whole; the readers
check a file is a Lightning checkpoint of the right model before any weights or training state are touched.

``videoalign fit`` uses the writer by default; with a plain ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``.
Everything is read with ``torch.load(weights_only=True)``: tensors and primitives only, nothing is unpickled.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from typing_extensions import override

from lit_videoalign.backbones.fingerprint import check_fingerprint
from lit_videoalign.errors import UsageError, file_kind

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe local writes and weights-only reads.

    ``torch.save`` streams into a hidden ``.NAME.XXXX.tmp`` in the checkpoint's own folder, the file is flushed and
    fsynced, ``os.replace`` swaps it in (atomic within one filesystem) and the folder is fsynced so the rename survives
    a power cut. A kill at any moment leaves the old file or the new one, never a partial one; a save that raises
    removes its temporary file, and one killed outright leaves a ``.tmp`` that the next save to the same path removes.
    A save that runs out of disk space raises ``OSError(ENOSPC)`` naming the path and the bytes it needs (the previous
    checkpoint is intact); one into a read-only folder says so. (Lightning's own writer stages the file in the system
    temp folder and moves it, which becomes a non-atomic copy when that folder is on another filesystem, and holds a
    second copy of the checkpoint in memory.) Remote paths (``s3://``, ``gs://``, ...) go through Lightning's fsspec
    writer unchanged.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            _write_atomically(checkpoint, path)
        except (OSError, RuntimeError) as err:
            problem = _write_problem(err, path, checkpoint)
            if problem is None:
                raise
            raise problem from err
        _fsync_dir(path.parent)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **kwargs)
        except pickle.UnpicklingError as err:
            raise ValueError(f"cannot read {path} as a weights-only checkpoint: it holds pickled objects, which are "
                             "never unpickled; use a checkpoint written by `videoalign fit`") from err


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        from lit_videoalign.video_io import make_shareable
        make_shareable(tmp)  # mkstemp makes it private; give it the mode open() would under the user's umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_nbytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint, each storage counted once: about its size on disk."""
    seen: dict[tuple, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[(item.device.type, storage.data_ptr())] = storage.nbytes()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(seen.values())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _write_problem(err: BaseException, path: Path, checkpoint: dict[str, Any]) -> OSError | None:
    """A clear error for a save that failed for lack of space or a read-only folder; None for anything else."""
    chain, cause = [], err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    folder = path.parent if path.parent.exists() else next(p for p in path.parents if p.exists())
    free = shutil.disk_usage(folder).free
    needed = checkpoint_nbytes(checkpoint)
    # torch's zip writer reports a full disk as "RuntimeError: [enforce fail ...] file write failed", without errno
    writer_failed = isinstance(err, RuntimeError) and "write" in str(err) and free < needed
    if codes & set(_DISK_FULL) or writer_failed:
        previous = (f"the previous {path.name} is intact" if path.is_file() else "earlier checkpoints are untouched")
        return OSError(errno.ENOSPC, f"no space left on device while writing checkpoint {path}: it needs about "
                                     f"{_size(needed)} ({needed} bytes), {_size(free)} are free in {folder}; "
                                     f"{previous} and no temporary file is left. Free some space or point "
                                     "--trainer.default_root_dir (or the checkpoint dirpath) at another disk")
    if codes & set(_READ_ONLY):
        return PermissionError(errno.EACCES, f"cannot write checkpoint {path}: {folder} is read-only or not "
                                             "writable; point --trainer.default_root_dir (or the checkpoint dirpath) "
                                             "at a writable folder")
    return None


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading and checking ----------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True`` (``mmap=True``: tensors mapped, not read, for checks).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a Lightning checkpoint (a text file, an image, a bare state dict, a damaged
            archive), or it holds pickled objects, which are refused without being run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = file_kind(path)
    if kind is not None and kind != "a ZIP archive":
        raise ValueError(f"{path} is not a Lightning checkpoint: it is {kind}; expected a .ckpt written by "
                         "`videoalign fit` (or .safetensors weights)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path) and "Weights only load failed" not in str(err):
            raise ValueError(f"{path} is not a Lightning checkpoint ({str(err).splitlines()[0]}); expected a .ckpt "
                             "written by `videoalign fit` (or .safetensors weights)") from err
        raise ValueError(f"cannot read {path} as a weights-only checkpoint: it holds pickled objects, which are "
                         "never unpickled; use a checkpoint written by `videoalign fit` or a .safetensors file"
                         ) from err
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError) as err:  # a truncated or damaged archive
        raise ValueError(f"cannot read {path} as a weights-only checkpoint: it is truncated or damaged "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        held = (f"keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else type(ckpt).__name__)
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict'; it holds {held}); expected a .ckpt "
                         "written by `videoalign fit`, or .safetensors weights")
    return ckpt


def _class_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def check_model_class(ckpt: Mapping[str, Any], path: str | os.PathLike, class_path: str | None,
                      init_args: Mapping[str, Any] | None = None) -> None:
    """Refuse a checkpoint of another objective class than the config's model (LightningCLI would silently build the
    checkpoint's class instead), naming both classes and the hyperparameters that differ."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    saved = hparams.get("_class_path")
    if not saved or not class_path or saved == class_path:
        return
    init_args = {k: v for k, v in (init_args or {}).items()  # classes (backbone, optimizer) are not hyperparameters
                 if v is not None and not (hasattr(v, "get") and "class_path" in v)}
    theirs = {k for k in hparams if not k.startswith("_")}
    mine = set(init_args)
    changed = sorted(k for k in theirs & mine if hparams[k] != init_args[k])
    parts = [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for what, keys in
             (("only in the checkpoint", sorted(theirs - mine)), ("only in the config", sorted(mine - theirs)),
              ("different values", changed)) if keys]
    raise UsageError(f"{path} is a checkpoint of {_class_name(saved)} ({saved}), but the config's model is "
                     f"{_class_name(class_path)} ({class_path}); differing keys: {'; '.join(parts) or 'none'}. "
                     f"Use the config the checkpoint was trained with, or a {_class_name(class_path)} checkpoint")


def _backbone(model: nn.Module) -> str:
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return ""
    source = getattr(backbone, "pretrained_model_name_or_path", None)
    return f"; this model's backbone is {type(backbone).__name__}" + (f"({source!r})" if source else "")


def _frozen_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen-base tensors ``model``'s checkpoints leave out (see ``AlignmentModule.frozen_state_dict``)."""
    from lit_videoalign.objectives.base import AlignmentModule

    return model.frozen_state_dict() if isinstance(model, AlignmentModule) else {}


def check_state_dict(model: nn.Module, state: Mapping[str, Any], path: str | os.PathLike,
                     saved_class: str | None = None) -> None:
    """Raise unless ``state`` holds the weights of ``model`` (same keys, same shapes), naming the differences, both
    classes and the model's backbone. The frozen base of a LoRA model may be absent (a trainable-only checkpoint) or
    present (one written before checkpoints left it out); every weight that trains must be there."""
    required = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {k: tuple(v.shape) for k, v in _frozen_base(model).items()}
    expected = {**optional, **required}
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
               if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or resized:
        problems = [f"{len(found)} {what}, e.g. {', '.join(found[:3])}" for what, found in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", resized)) if found]
        written_by = f" (the checkpoint was written by {_class_name(saved_class)})" if saved_class else ""
        raise ValueError(f"{path} does not hold the weights of this {type(model).__name__}: {'; '.join(problems)}"
                         f"{written_by}. Use a checkpoint trained with the same config (model class, backbone, "
                         f"lora_rank){_backbone(model)}")


def load_weights(model: nn.Module, ckpt_path: str | os.PathLike) -> None:
    """Load trained weights into ``model`` from a safetensors file or a Lightning ``.ckpt`` (read with
    ``weights_only=True``, so nothing is unpickled beyond tensors and primitives). Keys must match, except that a
    trainable-only checkpoint of a LoRA run leaves the frozen base out: ``model`` keeps the base it was built with,
    after the checkpoint's fingerprint of that base is checked against it."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    saved_class = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except SafetensorError as err:  # e.g. a pickle renamed .safetensors: refused, never unpickled
            raise ValueError(f"{path} is not a valid safetensors file ({err}); expected one written by "
                             "safetensors.torch.save_file, or a .ckpt from `videoalign fit`") from err
    else:
        ckpt = read_checkpoint(path)
        state, saved_class = ckpt["state_dict"], (ckpt.get("hyper_parameters") or {}).get("_class_path")
        if ckpt.get("frozen_base_fingerprint") is not None:
            from lit_videoalign.objectives.base import AlignmentModule

            if not isinstance(model, AlignmentModule):
                raise ValueError(f"{path} holds only the trained weights over a frozen base; load it into the "
                                 f"AlignmentModule it was trained with, not a {type(model).__name__}")
            check_fingerprint(ckpt["frozen_base_fingerprint"], model.base_fingerprint(), str(path))
    check_state_dict(model, state, path, saved_class)
    model.load_state_dict(state, strict=True)
