"""``remote``: a reward whose scores come from a reward server (``reward-zoo serve``, :mod:`reward_zoo.server`).

    reward-zoo serve --reward quality --port 8765                             # in another process (or on another GPU)
    reward = create_reward("remote", url="http://127.0.0.1:8765")
    reward(videos, prompts, fps=8)          # POST /score
    reward.compare(videos_a, videos_b)      # POST /compare: the server's own pairwise judge, or Bradley-Terry

The client reads ``GET /info`` once, **at construction**: the served reward's dimensions, required inputs, frame and
size limits and score ranges become this instance's attributes (so the base class checks inputs and scores exactly as
in-process), and the server's ``max_batch`` splits large batches into several requests. A server that is down fails
at construction, before a run starts.

Not differentiable: scores come back as JSON numbers, so no gradient can flow to the videos; scoring videos that
require grad (with grad enabled) raises rather than silently cutting the graph. Use it in objectives that only need
score values (GRPO, DiffusionNFT, online DPO, rejection sampling), not reward-gradient training.

Errors are one line naming the URL and what to do: a refused connection (after ``retries`` attempts with exponential
backoff) raises ``ConnectionError``, no answer within ``timeout_s`` ``TimeoutError`` (not retried: the server may
still be scoring), a 5xx (retried) :class:`RemoteRewardError`, a 4xx (the request is wrong; not retried)
``ValueError`` with the server's message. Inside GRPO and DiffusionNFT a failed remote call masks that batch's samples
like any raising reward (``guarded_scores``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from urllib.parse import urlsplit

import torch
from torch import Tensor

from reward_zoo.base import RewardModel
from reward_zoo.pairwise import PairwiseReward
from reward_zoo.registry import register_reward
from reward_zoo.wire import TRANSPORTS, decode_response, encode_request


class RemoteRewardError(RuntimeError):
    """The reward server answered with a server error (5xx) after every retry: the served reward raised or the
    server is shutting down."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@register_reward("remote")
class RemoteReward(RewardModel, PairwiseReward):
    """Client of a reward server: ``reward(videos, prompts, references, fps)`` and ``compare(videos_a, videos_b,
    prompts, fps)`` are answered over HTTP (see the module docstring).

    Args:
        url: the server, ``http://127.0.0.1:PORT`` (what ``reward-zoo serve`` prints).
        timeout_s: seconds to wait for one answer (a large judge scoring a full batch needs more).
        retries: extra attempts after a refused or dropped connection or a 5xx answer (0: try once).
        backoff_s: wait before the first retry; doubled before each further one.
        transport: ``safetensors`` (video tensors) or ``mp4`` (H.264 per video, near-lossless, much smaller; even
            frame sizes only; PyAV's libx264 is not bit-reproducible from run to run, so runs that must repeat bit for
            bit use ``safetensors``).
        video_dtype: with ``safetensors``, ``uint8`` (quantised to 0..255, 4x smaller) or ``float32`` (exact).
    """

    differentiable = False

    def __init__(self, url: str = "http://127.0.0.1:8765", timeout_s: float = 120.0, retries: int = 2,
                 backoff_s: float = 0.5, transport: str = "safetensors", video_dtype: str = "uint8") -> None:
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://HOST:PORT of a reward server, got {url!r}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        if not (isinstance(backoff_s, (int, float)) and backoff_s >= 0):
            raise ValueError(f"backoff_s must be non-negative seconds, got {backoff_s!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if video_dtype not in ("uint8", "float32"):
            raise ValueError(f"video_dtype must be 'uint8' or 'float32', got {video_dtype!r}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self.transport, self.video_dtype = transport, video_dtype
        info = json.loads(self._request("GET", "/info"))
        self.server_info = info
        self.dimensions = tuple(info["dimensions"])
        self.pairwise_dimensions = tuple(info["pairwise_dimensions"])
        self.requires_prompts = bool(info["requires_prompts"])
        self.requires_references = bool(info["requires_references"])
        self.min_frames = int(info["min_frames"])
        self.input_frames = info["input_frames"]
        self.input_size = None if info["input_size"] is None else tuple(info["input_size"])
        self.expected_fps = info["expected_fps"]
        self.expected_resolution = None if info["expected_resolution"] is None else tuple(info["expected_resolution"])
        self.score_ranges = {d: tuple(r) for d, r in info["score_ranges"].items() if r is not None}
        self.max_batch, self.max_pairs = info["limits"]["max_batch"], info["limits"]["max_pairs"]
        self.max_request_bytes = info["limits"]["max_request_bytes"]

    def extra_repr(self) -> str:
        return f"url={self.url!r}, reward={self.server_info['name']!r}, transport={self.transport!r}"

    # -- scoring ----------------------------------------------------------------------------------------------------
    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        self._refuse_grad(videos)
        return self._post("score", (videos,), prompts, references, fps, self.max_batch)

    def forward_pair(self, videos_a: Tensor, videos_b: Tensor, prompts: list[str] | None,
                     fps: float | None) -> dict[str, Tensor]:
        self._refuse_grad(videos_a, videos_b)
        return self._post("compare", (videos_a, videos_b), prompts, None, fps, self.max_pairs)

    def _refuse_grad(self, *videos: Tensor) -> None:
        if torch.is_grad_enabled() and any(v.requires_grad for v in videos):
            raise RuntimeError(f"RemoteReward ({self.url}) is not differentiable: gradients cannot flow through a "
                               f"remote reward (its scores come back as JSON over HTTP); score under torch.no_grad() "
                               f"in an objective that needs score values only (GRPO, DiffusionNFT), or use an "
                               f"in-process differentiable reward for reward-gradient training")

    def _post(self, kind: str, videos: tuple[Tensor, ...], prompts: list[str] | None, references: Tensor | None,
              fps: float | None, chunk: int) -> dict[str, Tensor]:
        """Send ``videos`` in requests of at most ``chunk`` videos (pairs) and join the answers."""
        n, device = videos[0].shape[0], videos[0].device
        dims = (*(self.dimensions if kind == "score" else self.pairwise_dimensions), "overall")
        parts = []
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            body = encode_request(kind, tuple(v[start:end] for v in videos),
                                  None if prompts is None else list(prompts[start:end]),
                                  None if references is None else references[start:end], fps,
                                  transport=self.transport, video_dtype=self.video_dtype)
            if len(body) > self.max_request_bytes:
                raise ValueError(f"a request of {end - start} {'videos' if kind == 'score' else 'pairs'} is "
                                 f"{len(body)} bytes, more than the reward server {self.url} accepts "
                                 f"(max_request_bytes={self.max_request_bytes}); restart it with a larger "
                                 f"--max_request_mb, or use transport='mp4'")
            answer = self._request("POST", f"/{kind}", body)
            parts.append(decode_response(answer, kind, end - start, dims))
        return {d: torch.cat([p[d] for p in parts]).to(device) for d in dims}

    # -- HTTP -------------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The answer body of one request, with retries for refused/dropped connections and 5xx answers."""
        where = f"{self.url}{path}"
        start_hint = (f"start it with `reward-zoo serve --reward NAME_OR_CONFIG --port {urlsplit(self.url).port}` "
                      f"or fix the url")
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(where, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code < 500:
                    raise ValueError(f"reward server {where} refused the request ({err.code}): {message}") from None
                last = RemoteRewardError(f"reward server {where} failed ({err.code}: {message}) after {attempt + 1} "
                                         f"attempt(s); see the server's output, fix the reward or the request, and "
                                         f"restart it if needed", err.code)
            except (TimeoutError, urllib.error.URLError, ConnectionError, HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError):
                    raise TimeoutError(f"reward server {where} did not answer within timeout_s={self.timeout_s:g}; "
                                       f"raise timeout_s (a large judge needs longer per batch) or check that the "
                                       f"server is not stuck") from None
                last = ConnectionError(f"reward server {self.url} is not reachable ({type(reason).__name__}: "
                                       f"{reason}) after {attempt + 1} attempt(s); {start_hint}")
        raise last


def _error_message(err: urllib.error.HTTPError) -> str:
    """The one-line ``error`` of a server's JSON answer, or the HTTP reason."""
    try:
        return str(json.loads(err.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(err.reason)

