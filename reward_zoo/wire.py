"""The reward server's wire format, in one place for the server (:mod:`reward_zoo.server`) and the client
(:mod:`reward_zoo.remote`).

A request body is one safetensors file (never a pickle):

- pointwise (``POST /score``): tensor ``videos`` ``[B, T, C, H, W]``, ``uint8`` (0..255) or ``float32`` in [0, 1];
  or MP4 files as 1-D ``uint8`` tensors ``mp4_0 ... mp4_{B-1}`` (decoded with PyAV; every video the same size);
  optional ``references`` (images ``[B, C, H, W]`` or videos ``[B, T, C, H, W]``, ``uint8`` or ``float32``);
- pairwise (``POST /compare``): ``videos_a`` and ``videos_b``, or ``mp4_a_{i}`` and ``mp4_b_{i}``;
- the safetensors ``__metadata__`` entry ``"request"``: JSON ``{"prompts": [str, ...] | null, "fps": number | null}``
  (``fps`` is the videos' frame rate; for MP4 it wins over the container's).

The answer is JSON: ``{"scores": {dimension: [float | null, ...]}}`` (``/score``) or ``{"probs": {...}}``
(``/compare``), one entry per video or pair, ``null`` for a sample the reward scored NaN; an error is
``{"error": "<one line>"}`` with a 4xx (the request) or 5xx (the reward) status.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lit_videoalign.video_io import check_video, probe_video, read_video, write_mp4

REQUEST_KEY = "request"  # the __metadata__ entry holding the JSON fields
VIDEO_KEYS = {"score": ("videos",), "compare": ("videos_a", "videos_b")}
MP4_PREFIXES = {"score": ("mp4_",), "compare": ("mp4_a_", "mp4_b_")}
RESULT_KEYS = {"score": "scores", "compare": "probs"}
VIDEO_DTYPES = {"U8": torch.uint8, "F32": torch.float32}  # safetensors dtype names accepted for videos
TRANSPORTS = ("safetensors", "mp4")


class WireError(ValueError):
    """A request the server refuses: ``status`` (400 bad request, 413 too large) and a one-line message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """A decoded request: ``videos`` is one ``[B, T, C, H, W]`` float32 tensor in [0, 1] for ``score``, two (a, b)
    for ``compare``."""

    kind: str
    videos: tuple[Tensor, ...]
    prompts: list[str] | None = None
    references: Tensor | None = None
    fps: float | None = None

    @property
    def size(self) -> int:
        """Videos (``score``) or pairs (``compare``) in the request."""
        return self.videos[0].shape[0]


# -- client side ----------------------------------------------------------------------------------------------------
def encode_request(kind: str, videos: tuple[Tensor, ...], prompts: list[str] | None = None,
                   references: Tensor | None = None, fps: float | None = None, transport: str = "safetensors",
                   video_dtype: str = "uint8") -> bytes:
    """The body of a ``kind`` (``score`` or ``compare``) request. ``videos``: float ``[B, T, C, H, W]`` in [0, 1]
    (one tensor, or a and b). ``video_dtype`` ``uint8`` quantises to 0..255 (4x smaller), ``float32`` sends them
    exactly; ``transport="mp4"`` sends each video as H.264 (near-lossless, even frame sizes only)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if video_dtype not in ("uint8", "float32"):
        raise ValueError(f"video_dtype must be 'uint8' or 'float32', got {video_dtype!r}")
    tensors: dict[str, Tensor] = {}
    for key, prefix, video in zip(VIDEO_KEYS[kind], MP4_PREFIXES[kind], videos):
        if transport == "mp4":
            tensors.update({f"{prefix}{i}": mp4 for i, mp4 in enumerate(encode_mp4s(video, fps))})
        else:
            tensors[key] = _to_wire(video, video_dtype)
    if references is not None:
        tensors["references"] = _to_wire(references, video_dtype)
    fields = {"prompts": None if prompts is None else list(prompts), "fps": fps}
    return save_safetensors(tensors, metadata={REQUEST_KEY: json.dumps(fields)})


def _to_wire(videos: Tensor, video_dtype: str) -> Tensor:
    videos = videos.detach().float().cpu()
    if video_dtype == "uint8":
        return (videos * 255).round().to(torch.uint8).contiguous()
    return videos.clone(memory_format=torch.contiguous_format)  # own storage: safetensors refuses shared memory


def quantize(videos: Tensor) -> Tensor:
    """What the server sees of float videos sent as ``uint8``: ``round(v * 255) / 255``."""
    return (videos.detach().float() * 255).round() / 255


def encode_mp4s(videos: Tensor, fps: float | None) -> list[Tensor]:
    """Each video of ``[B, T, C, H, W]`` as MP4 bytes in a 1-D ``uint8`` tensor (H.264, near-lossless yuv444p)."""
    h, w = videos.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"transport='mp4' needs even frame sizes (H.264), got {h}x{w}; use transport='safetensors'")
    rate = 8 if fps is None else max(1, round(fps))  # the container's rate; the request's fps field is what counts
    out = []
    with tempfile.TemporaryDirectory(prefix="reward_wire_") as tmp:
        for i, video in enumerate(videos):
            path = write_mp4(video.detach().float().cpu(), Path(tmp) / f"{i}.mp4", fps=rate)
            out.append(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
    return out


def decode_response(body: bytes, kind: str, batch_size: int, dimensions: tuple[str, ...]) -> dict[str, Tensor]:
    """``{dimension: float32 Tensor[batch_size]}`` from a JSON answer (``null`` -> NaN); raises unless it holds
    exactly ``dimensions`` with one value per video or pair."""
    key = RESULT_KEYS[kind]
    try:
        values = json.loads(body)[key]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the reward server's answer is not JSON with a {key!r} entry ({err})") from None
    if not isinstance(values, dict) or set(values) != set(dimensions):
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise ValueError(f"the reward server answered {key} {got}, expected {sorted(dimensions)}")
    out = {}
    for dim, column in values.items():
        if not isinstance(column, list) or len(column) != batch_size:
            raise ValueError(f"the reward server answered {len(column) if isinstance(column, list) else column!r} "
                             f"values for {dim!r}, expected {batch_size}")
        out[dim] = torch.tensor([math.nan if v is None else float(v) for v in column], dtype=torch.float32)
    return out


# -- server side ----------------------------------------------------------------------------------------------------
def encode_result(kind: str, values: dict[str, Tensor]) -> dict:
    """The JSON answer: ``{"scores" | "probs": {dimension: [float | None]}}``, non-finite values as ``None``."""
    return {RESULT_KEYS[kind]: {dim: [float(x) if math.isfinite(x) else None for x in v.detach().float().cpu().tolist()]
                                for dim, v in values.items()}}


def read_header(body: bytes) -> dict:
    """The safetensors header of ``body`` (parsed as JSON, so its dtypes and sizes are checked before any tensor is
    read), or a :class:`WireError` naming what is wrong."""
    if len(body) < 8:
        raise WireError(f"request body is {len(body)} bytes, expected a safetensors file (at least 8 bytes)")
    n = int.from_bytes(body[:8], "little")
    if n > len(body) - 8:
        raise WireError(f"request body is truncated or not a safetensors file: its header claims {n} bytes but "
                        f"only {len(body) - 8} follow")
    try:
        header = json.loads(body[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise WireError("request body is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise WireError(f"request body is not a safetensors file: its header is {type(header).__name__}, not an "
                        "object")
    data_size = len(body) - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise WireError(f"tensor {key!r} has no valid data_offsets in the safetensors header")
        if offsets[1] > data_size:
            raise WireError(f"request body is truncated: tensor {key!r} ends at byte {offsets[1]} of the data, but "
                            f"the body holds {data_size} data bytes")
    return header


def decode_request(body: bytes, kind: str, max_decoded_bytes: int | None = None) -> Request:
    """Parse and check a ``kind`` request body; raise :class:`WireError` naming the bad value and what was expected.
    ``max_decoded_bytes`` bounds what MP4 files may decode to (as ``uint8``), so a small file cannot expand without
    limit."""
    header = read_header(body)
    fields = _request_fields(header.get("__metadata__"))
    names = [k for k in header if k != "__metadata__"]
    video_keys, prefixes = VIDEO_KEYS[kind], MP4_PREFIXES[kind]
    allowed = {*video_keys, "references"}
    unexpected = [k for k in names if k not in allowed and not any(_mp4_index(k, p) is not None for p in prefixes)]
    if unexpected:
        raise WireError(f"unexpected tensor {unexpected[0]!r} in a /{kind} request; expected "
                        f"{' and '.join(video_keys)} (uint8 or float32 [B, T, C, H, W]) or "
                        f"{' and '.join(p + '{i}' for p in prefixes)} (MP4 bytes), and optional references")
    for key in names:
        dtype = header[key].get("dtype")
        if key in allowed and dtype not in VIDEO_DTYPES:
            raise WireError(f"{key} has dtype {dtype}, expected U8 (uint8, 0..255) or F32 (float32 in [0, 1])")
        if key not in allowed and dtype != "U8":
            raise WireError(f"{key} has dtype {dtype}, expected U8 (the bytes of an MP4 file)")
    try:
        tensors = load_safetensors(body)
    except SafetensorError as err:
        raise WireError(f"request body is not a valid safetensors file ({err})") from None

    videos = []
    for key, prefix in zip(video_keys, prefixes):
        mp4s = {i: t for k, t in tensors.items() if (i := _mp4_index(k, prefix)) is not None}
        if key in tensors and mp4s:
            raise WireError(f"a request sends {key} either as a tensor or as MP4 files {prefix}{{i}}, not both")
        if key in tensors:
            videos.append(_video(tensors[key], key))
        elif mp4s:
            videos.append(_decode_mp4s(mp4s, max_decoded_bytes, prefix))
        else:
            raise WireError(f"a /{kind} request needs {key} (uint8 or float32 [B, T, C, H, W]) or MP4 files "
                            f"{prefix}0, {prefix}1, ...; got tensors {sorted(names)}")
    if kind == "compare":
        a, b = videos
        if a.shape[0] != b.shape[0]:
            raise WireError(f"videos_a has {a.shape[0]} videos but videos_b has {b.shape[0]}; pairs need equal "
                            "batch sizes")
        if a.shape[1:] != b.shape[1:]:
            raise WireError(f"videos_a have shape {tuple(a.shape[1:])} [T, C, H, W] but videos_b have "
                            f"{tuple(b.shape[1:])}; the two videos of a pair must have the same shape")
    n = videos[0].shape[0]
    references = tensors.get("references")
    if references is not None:
        if kind == "compare":
            raise WireError("/compare takes no references")
        references = _references(references, n)
    prompts = fields.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise WireError(f"prompts must be a list of strings or null, got {type(prompts).__name__}")
        if len(prompts) != n:
            raise WireError(f"{len(prompts)} prompts for {n} {'pairs' if kind == 'compare' else 'videos'}; expected "
                            "one prompt each")
    fps = fields.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                            or fps <= 0):
        raise WireError(f"fps must be a positive number of frames per second or null, got {fps!r}")
    return Request(kind, tuple(videos), prompts, references, None if fps is None else float(fps))


def _request_fields(metadata) -> dict:
    if metadata is None or REQUEST_KEY not in metadata:
        return {}
    if not isinstance(metadata, dict) or not isinstance(metadata[REQUEST_KEY], str):
        raise WireError(f"the safetensors __metadata__ must map strings to strings, with {REQUEST_KEY!r} holding JSON")
    try:
        fields = json.loads(metadata[REQUEST_KEY])
    except ValueError:
        raise WireError(f"__metadata__[{REQUEST_KEY!r}] is not JSON: expected {{\"prompts\": [...], \"fps\": ...}}") \
            from None
    if not isinstance(fields, dict):
        raise WireError(f"__metadata__[{REQUEST_KEY!r}] must be a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - {"prompts", "fps"})
    if unknown:
        raise WireError(f"unknown request field {unknown[0]!r}; expected 'prompts' and 'fps'")
    return fields


def _mp4_index(key: str, prefix: str) -> int | None:
    rest = key[len(prefix):] if key.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def _to_float(t: Tensor) -> Tensor:
    return t.float() / 255 if t.dtype == torch.uint8 else t


def _video(t: Tensor, name: str) -> Tensor:
    """A wire tensor as float videos ``[B, T, C, H, W]`` in [0, 1], checked."""
    if t.ndim != 5:
        raise WireError(f"{name} has {t.ndim} dimensions (shape {tuple(t.shape)}), expected 5: [B, T, C, H, W]")
    b, frames = t.shape[:2]
    if b == 0:
        raise WireError(f"{name} holds no videos (shape {tuple(t.shape)}), expected at least one")
    if frames == 0:
        raise WireError(f"{name} has 0 frames (shape {tuple(t.shape)}), expected at least 1 per video")
    if 0 in t.shape:
        raise WireError(f"{name} has an empty dimension (shape {tuple(t.shape)})")
    t = _to_float(t)
    try:
        check_video(t, batched=True, name=name)
    except (TypeError, ValueError) as err:
        raise WireError(str(err)) from None
    return t


def _references(t: Tensor, n: int) -> Tensor:
    if t.ndim not in (4, 5) or t.shape[0] != n or 0 in t.shape:
        raise WireError(f"references must be images [B, C, H, W] or videos [B, T, C, H, W] with B={n}, got shape "
                        f"{tuple(t.shape)}")
    t = _to_float(t)
    try:
        check_video(t, batched=t.ndim == 5, name="references")
    except (TypeError, ValueError) as err:
        raise WireError(str(err)) from None
    return t


def _decode_mp4s(mp4s: dict[int, Tensor], max_decoded_bytes: int | None, prefix: str = "mp4_") -> Tensor:
    """MP4 files ``{index: uint8 bytes}`` (indices 0..n-1) decoded into ``[n, T, C, H, W]`` float32 in [0, 1]."""
    if sorted(mp4s) != list(range(len(mp4s))):
        raise WireError(f"MP4 files must be numbered {prefix}0 ... {prefix}{len(mp4s) - 1} without gaps, got indices "
                        f"{sorted(mp4s)}")
    frames, total = [], 0
    with tempfile.TemporaryDirectory(prefix="reward_wire_") as tmp:
        for i in range(len(mp4s)):
            data = mp4s[i]
            if data.ndim != 1:
                raise WireError(f"{prefix}{i} has shape {tuple(data.shape)}, expected 1-D bytes of an MP4 file")
            path = Path(tmp) / f"{i}.mp4"
            path.write_bytes(data.numpy().tobytes())
            try:
                info = probe_video(path, decode=False)
                total += info.num_frames * info.height * info.width * 3
                if max_decoded_bytes is not None and total > max_decoded_bytes:
                    raise WireError(f"the MP4 files decode to more than {max_decoded_bytes} bytes (uint8), the "
                                    f"server's max_request_bytes; send fewer or smaller videos", status=413)
                frames.append(read_video(path))
            except WireError:
                raise
            except ValueError as err:
                raise WireError(f"{prefix}{i} is not a decodable MP4 video: {str(err).replace(str(path), 'it')}") \
                    from None
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) > 1:
        raise WireError(f"the MP4 videos {prefix}{{i}} differ in shape {sorted(shapes)} [T, C, H, W]; one request "
                        "holds videos of one size and length")
    return torch.stack(frames)
