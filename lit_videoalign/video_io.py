"""Video files in and out: MP4 through PyAV (its wheel bundles FFmpeg with libx264), GIF and PNG grids through Pillow.

Every function takes or returns pixel videos in the project convention: ``Tensor[T, C, H, W]`` (one video) or
``Tensor[B, T, C, H, W]``, float32 RGB in ``[0, 1]``. Writes are atomic: a file appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lit_videoalign.errors import file_kind, shorten

MAX_LISTED = 20  # bad files listed in one error message
MANIFEST = "metadata.jsonl"  # one {"file_name": ..., "prompt": ...} per line (the Hugging Face videofolder layout)
_UMASK_LOCK = threading.Lock()


def check_video(video: Tensor, *, batched: bool, name: str = "video") -> None:
    """Raise a clear error unless ``video`` is a float tensor of the right rank with 3 channels in ``[0, 1]``."""
    rank, layout = (5, "[B, T, C, H, W]") if batched else (4, "[T, C, H, W]")
    if not isinstance(video, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(video).__name__}")
    if video.ndim != rank:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {video.dtype}")
    if video.shape[-3] != 3:
        raise ValueError(f"{name} must be RGB with 3 channels at dim -3 of {layout}, got shape {tuple(video.shape)}")
    if video.numel() and not torch.isfinite(video).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if video.numel():
        lo, hi = float(video.min()), float(video.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """``[T, C, H, W]`` in ``[0, 1]`` -> ``uint8`` array ``[T, H, W, C]``."""
    check_video(video, batched=False)
    return (video.detach().float().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``); elsewhere it is
    set to ``0o077`` and back under a lock, so a file another thread creates meanwhile can only be more private."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike) -> Path:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (owner-only) the mode a plain ``open()`` or
    ``mkdir()`` would have given it under the user's umask: ``0o666 & ~umask`` for a file, ``0o777 & ~umask`` for a
    folder. Every atomic writer calls this before renaming its temporary into place."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds (with the mode a
    plain ``open()`` would give, see :func:`make_shareable`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_shareable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; it replaces ``path`` (whole) only if the block succeeds (with the
    mode a plain ``mkdir()`` would give, see :func:`make_shareable`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        make_shareable(tmp)
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


def write_mp4(video: Tensor, path: str | os.PathLike, fps: int = 8, upscale: int = 1) -> Path:
    """Write one video as H.264 MP4 (yuv444p, near-lossless, so small toy frames keep their colours).

    Args:
        video: ``[T, C, H, W]`` in ``[0, 1]``.
        path: output file.
        fps: frames per second.
        upscale: nearest-neighbour upscaling factor, for viewing tiny videos.
    """
    import av

    frames = to_uint8_frames(video)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {h}x{w}; pass upscale=2")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
            stream.options = {"crf": "8"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return Path(path)


class StreamingMP4Writer:
    """An MP4 written a few frames at a time, for videos that are generated as a stream (``generate --stream``).

    Each :meth:`write` encodes its frames and flushes them to a temporary file beside ``path``, so the file grows as
    the video is produced; :meth:`commit` finishes it and renames it onto ``path`` (atomic, as every writer here), and
    :meth:`discard` removes it. The encoding is :func:`write_mp4`'s (H.264 yuv444p, crf 8) without encoder look-ahead
    (``zerolatency``), so frames leave the encoder as they arrive, in a fragmented MP4, which players read while it
    grows. The muxer closes a frame's fragment when the next frame comes, so all frames but the newest are on disk
    after each write. As a context manager it commits on success and discards on error.

    Args:
        path: the final file.
        fps: frames per second.
        upscale: nearest-neighbour upscaling factor, for viewing tiny videos.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 8, upscale: int = 1) -> None:
        self.path, self.fps, self.upscale = Path(path), fps, upscale
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=self.path.suffix, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)  # the growing file
        self.num_frames = 0
        self._container = self._stream = None
        self._closed = False

    def write(self, frames: Tensor) -> None:
        """Encode frames ``[T, C, H, W]`` in ``[0, 1]`` (all the same size) and flush them to the temporary file."""
        import av

        if self._closed:
            raise ValueError(f"{self.path} is closed; cannot write more frames")
        array = to_uint8_frames(frames)  # (t, h, w, c)
        if self.upscale > 1:
            array = array.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        t, h, w, _ = array.shape
        if self._stream is None:
            if h % 2 or w % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {h}x{w}; pass upscale=2")
            # empty_moov + a fragment per frame: the file is playable at every point; flush_packets: no I/O buffering
            self._container = av.open(str(self.tmp), mode="w", format="mp4", options={
                "movflags": "empty_moov+default_base_moof+frag_every_frame", "flush_packets": "1"})
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv444p"
            self._stream.options = {"crf": "8", "tune": "zerolatency"}
        elif (h, w) != (self._stream.height, self._stream.width):
            raise ValueError(f"frames of {h}x{w} for {self.path}, expected {self._stream.height}x{self._stream.width} "
                             "as before")
        for frame in array:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.num_frames += t

    def close(self) -> None:
        """Flush the encoder and finish the file, still under its temporary name."""
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            try:
                self._container.mux(self._stream.encode())
            finally:
                self._container.close()

    def commit(self) -> Path:
        """Finish the file and rename it onto ``path``."""
        self.close()
        if not self.num_frames:
            self.discard()
            raise ValueError(f"no frames were written for {self.path}; expected at least one")
        make_shareable(self.tmp)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the temporary file (a failed stream leaves nothing behind)."""
        try:
            self.close()
        except Exception:  # an encoder left in a bad state by the error being cleaned up after
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingMP4Writer:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def read_video(path: str | os.PathLike, num_frames: int | None = None) -> Tensor:
    """Decode a video file with PyAV into ``[T, C, H, W]`` float32 in ``[0, 1]``.

    Args:
        path: the file.
        num_frames: if given, the file must hold at least this many frames and only the first ones are returned.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as err:
        raise _undecodable(path, err) from err
    if not frames:
        raise ValueError(f"video {path} has no frames")
    if num_frames is not None:
        if len(frames) < num_frames:
            raise ValueError(f"video {path} has {len(frames)} frames, expected at least {num_frames}")
        frames = frames[:num_frames]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def _undecodable(path: Path, err: BaseException) -> ValueError:
    kind = file_kind(path)
    return ValueError(f"cannot decode video {path}: " + (f"it is {kind}, not a video" if kind else str(err)))


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds, from :func:`probe_video`."""

    num_frames: int
    height: int
    width: int
    fps: float | None = None  # the stream's average frame rate; None when the container does not record one


def probe_video(path: str | os.PathLike, decode: bool = True) -> VideoInfo:
    """Open a video with PyAV and count its frames.

    Args:
        path: the file.
        decode: decode every frame (catches damage anywhere in the file); False decodes only the first frame and
            counts the remaining packets (fast, for large datasets).

    Raises:
        ValueError: the file is not a decodable video (naming it and what it is instead, or FFmpeg's reason).
    """
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            if decode:
                count, size = 0, None
                for frame in container.decode(stream):
                    count, size = count + 1, size or (frame.height, frame.width)
            else:
                first = next(iter(container.decode(stream)), None)
                size = (first.height, first.width) if first is not None else None
                container.seek(0)
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except (av.error.FFmpegError, StopIteration, IndexError) as err:
        raise _undecodable(path, err) from err
    if not count or size is None:
        raise ValueError(f"video {path} has no frames")
    return VideoInfo(count, *size, fps=fps)


def check_video_files(paths: Sequence[str | os.PathLike], num_frames: int | None = None, decode: bool = True,
                      what: str = "videos") -> list[VideoInfo]:
    """Probe every file (:func:`probe_video`) and raise one error listing all the bad ones: missing, empty, truncated,
    not a video, or shorter than ``num_frames``.

    Returns:
        The :class:`VideoInfo` of each file, in order.
    """
    infos, problems = [], []
    for path in paths:
        try:
            if not Path(path).is_file():
                raise ValueError(f"video file not found: {path}")
            info = probe_video(path, decode=decode)
            if num_frames is not None and info.num_frames < num_frames:
                raise ValueError(f"video {path} has {info.num_frames} frames, expected at least {num_frames}")
            infos.append(info)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ValueError(f"{len(problems)} of {len(paths)} {what} cannot be used: {listed}{more}")
    return infos


def write_gif(video: Tensor, path: str | os.PathLike, fps: int = 8, upscale: int = 4) -> Path:
    """Write one video ``[T, C, H, W]`` (or a grid made by :func:`video_grid`) as a looping GIF."""
    from PIL import Image

    frames = to_uint8_frames(video)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return Path(path)


def video_grid(videos: Tensor | Sequence[Tensor], ncols: int | None = None, pad: int = 1) -> Tensor:
    """Tile videos ``[B, T, C, H, W]`` into one video ``[T, C, H', W']`` with a white ``pad`` between tiles."""
    videos = torch.stack(list(videos)) if not isinstance(videos, Tensor) else videos
    check_video(videos, batched=True, name="videos")
    b, t, c, h, w = videos.shape
    ncols = ncols or b
    nrows = (b + ncols - 1) // ncols
    grid = torch.ones(t, c, nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, :, y:y + h, x:x + w] = videos[i]
    return grid


def write_frames_png(video: Tensor, path: str | os.PathLike, upscale: int = 4) -> Path:
    """Write every frame of ``[T, C, H, W]`` side by side as one PNG strip (a still for READMEs and reviews)."""
    from PIL import Image

    frames = to_uint8_frames(video)
    strip = np.concatenate(list(frames), axis=1)
    if upscale > 1:
        strip = strip.repeat(upscale, axis=0).repeat(upscale, axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
    return Path(path)


def read_manifest(folder: str | os.PathLike) -> list[tuple[Path, dict]]:
    """The videos a folder's ``metadata.jsonl`` lists, as ``(path, entry)`` in file order.

    Each line is ``{"file_name": ..., "prompt": ...}`` with optional keys (``videoalign generate`` adds ``seed``,
    ``upscale`` and ``preview``, the path of its GIF). Kept here, beside the other file formats, so the reward zoo reads
    the same manifests as the suite without importing it.

    Raises:
        FileNotFoundError: the folder has no manifest.
        ValueError: a line that is not such an object (naming the file and line), a ``file_name`` that leaves the
            folder, or a manifest that lists nothing.
    """
    root = Path(folder).resolve()
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}; a video folder needs one line "
                                '{"file_name": ..., "prompt": ...} per video (videoalign generate writes it)')
    entries = []
    for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); expected one "
                             f"{{\"file_name\": ..., \"prompt\": ...}} object per line, got {shorten(line)}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or "file_name" not in entry:
            raise ValueError(f"{where}: expected {{\"file_name\": ..., \"prompt\": ...}}, got {shorten(line)}")
        name = entry["file_name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: expected a non-empty relative path string as file_name, got {shorten(name)}")
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{where}: path {name!r} escapes the dataset root {root}")
        entries.append((path, entry))
    if not entries:
        raise ValueError(f"{manifest} lists no videos")
    return entries
