"""``AtomicCheckpointIO``: a checkpoint is written to a temporary file beside it and renamed over it, so a run killed
in the middle of a save keeps its previous checkpoint whole.

``videoalign fit`` uses it by default; with a plain ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe local writes.

    ``torch.save`` streams into a hidden ``.NAME.XXXX.tmp`` in the checkpoint's own folder, the file is flushed and
    fsynced, ``os.replace`` swaps it in (atomic within one filesystem) and the folder is fsynced so the rename survives
    a power cut. A kill at any moment leaves the old file or the new one, never a partial one; a save that raises
    removes its temporary file, and one killed outright leaves a ``.tmp`` that the next save to the same path removes.
    (Lightning's own writer stages the file in the system temp folder and moves it, which becomes a non-atomic copy
    when that folder is on another filesystem, and holds a second copy of the checkpoint in memory.) Remote paths
    (``s3://``, ``gs://``, ...) go through Lightning's fsspec writer unchanged.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed while saving
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is ordinary data
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(path.parent)


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
