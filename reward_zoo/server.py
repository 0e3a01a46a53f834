"""A reward server: any zoo reward, pointwise and pairwise, over HTTP on loopback, batching concurrent requests.

Large judges (VLM rewards) run as their own process, often on their own GPU, while the trainer generates the next
rollouts (Flow-Factory, VeRL-Omni serve rewards this way); :class:`reward_zoo.remote.RemoteReward` is the client.

    reward-zoo serve --reward quality --port 8765                  # blocks; Ctrl-C or SIGTERM stops it
    server = start_server(create_reward("newton"), port=0)         # Python: serves from a background thread
    server.url, server.close()                                     # or `with start_server(...) as server:`

Endpoints (JSON answers; errors are ``{"error": "<one line>"}``):

- ``GET /health`` -> ``{"status": "ok"}``.
- ``GET /info`` -> the reward's name and class, ``dimensions``, ``pairwise_dimensions``, ``pairwise`` (``native``:
  the reward's own ``compare``; ``bradley_terry``: through :func:`~reward_zoo.pairwise.bt_pairwise`),
  ``differentiable``, ``requires_prompts``, ``requires_references``, ``min_frames``, ``input_frames``, ``input_size``,
  ``expected_fps``, ``expected_resolution``, ``score_ranges``, the model card metadata (``card``) and the server's
  ``limits`` (``max_batch``, ``max_pairs``, ``max_request_bytes``).
- ``POST /score`` -> ``{"scores": {dimension: [float | null per video]}}``.
- ``POST /compare`` -> ``{"probs": {dimension: [P(a beats b) per pair]}}``.

Request bodies are safetensors files, never pickles; the format is :mod:`reward_zoo.wire`'s: tensors ``videos``
(``uint8`` 0..255 or ``float32`` in [0, 1], ``[B, T, C, H, W]``) or MP4 bytes ``mp4_0, mp4_1, ...`` (``1-D uint8``),
``videos_a``/``videos_b`` or ``mp4_a_{i}``/``mp4_b_{i}`` for ``/compare``, optional ``references``, and
``__metadata__["request"]`` = JSON ``{"prompts": [...] | null, "fps": number | null}``.

Batching: each request is checked in its own handler thread (a bad request answers 4xx there and never reaches the
reward), then queued; one worker thread takes the oldest queued request and every other queued request of the same
kind, video shape, fps and inputs, up to ``max_batch`` videos (a pair counts as two; at least one pair), scores them
in one reward call and splits the results back. A batch whose reward call raises is retried request by request, so
one failing request fails alone (500 with the reward's message). Bounds: ``max_request_bytes`` is checked from
``Content-Length`` before the body is read (413), also bounds what MP4 files may decode to, and a request holding
more than ``max_batch`` videos (``max_pairs`` pairs) is refused with 413 (the client splits its batches).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import Tensor

from lit_videoalign.errors import one_line
from reward_zoo.base import RewardModel
from reward_zoo.pairwise import PairwiseReward, bt_pairwise
from reward_zoo.wire import Request, WireError, decode_request, encode_result

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_REQUEST_BYTES = 2**30  # 1 GiB: 8 uint8 videos of 81 frames at 480x832 (97 MB each) fit in one request
BATCH_WAIT_S = 0.01  # the worker waits this long after the first queued request, so a burst is scored together
READ_TIMEOUT_S = 60.0  # a client that stops sending its body mid-way is dropped after this long
ENDPOINTS = {"GET": ("/health", "/info"), "POST": ("/score", "/compare")}


def check_host(host: str, allow_remote: bool = False) -> str:
    """``host``, refused unless it is a loopback address or ``allow_remote``: the server has no authentication or
    encryption, so anyone who can reach it could make it run the reward (and its GPU) on their inputs."""
    try:
        address = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
    except (socket.gaierror, ValueError) as err:
        raise ValueError(f"cannot resolve host {host!r} ({err}); use 127.0.0.1") from None
    if not address.is_loopback and not allow_remote:
        raise ValueError(f"host {host!r} ({address}) is not a loopback address: the reward server has no "
                         f"authentication or encryption, so anyone who can reach it could run the reward on their "
                         f"inputs; serve on 127.0.0.1 (reach it through an SSH tunnel), or pass --allow_remote "
                         f"(allow_remote=True) behind a firewall")
    return host


@dataclass(eq=False)
class _Job:
    """A checked request waiting for the worker; ``status``/``answer`` are set when it is done."""

    request: Request
    key: tuple
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    answer: dict | None = None


class RewardServer:
    """Serves ``reward`` over HTTP from background threads (see the module docstring); build it with
    :func:`start_server`.

    Attributes:
        url: ``http://host:port`` (the bound port when ``port=0``).
        reward_calls: reward calls made so far (a batch is one call, however many requests it holds).
        requests: ``/score`` and ``/compare`` requests received, answered or refused.
    """

    def __init__(self, reward: RewardModel, host: str = "127.0.0.1", port: int = 0,
                 max_batch: int = DEFAULT_MAX_BATCH, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 delay_s: float = 0.0, name: str | None = None, allow_remote: bool = False) -> None:
        if not isinstance(reward, RewardModel):
            raise TypeError(f"the reward server serves a reward_zoo RewardModel, got {type(reward).__name__}")
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not (isinstance(max_request_bytes, int) and max_request_bytes >= 1024):
            raise ValueError(f"max_request_bytes must be an integer of at least 1024, got {max_request_bytes!r}")
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be non-negative seconds, got {delay_s!r}")
        self.reward = reward.eval()
        self.pairwise = reward if isinstance(reward, PairwiseReward) else bt_pairwise(reward)
        self.name = name or type(reward).__name__
        self.max_batch, self.max_request_bytes, self.delay_s = max_batch, max_request_bytes, float(delay_s)
        self.max_pairs = max(1, max_batch // 2)
        self.reward_calls = self.requests = 0
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._closing = False
        check_host(host, allow_remote)
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._httpd = server_class((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self
        bound_host, bound_port = self._httpd.server_address[:2]
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        self._info = self._build_info()
        self._threads = [threading.Thread(target=self._httpd.serve_forever, name="reward-server-http", daemon=True),
                         threading.Thread(target=self._work, name="reward-server-worker", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting connections, answer queued requests with 503 and stop the threads. Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        """What ``GET /info`` answers."""
        return self._info

    def _build_info(self) -> dict:
        r = self.reward
        size = r.input_size
        resolution = r.expected_resolution
        dims = (*r.dimensions, "overall")
        return {
            "name": self.name,
            "class": f"{type(r).__module__}.{type(r).__qualname__}",
            "dimensions": list(r.dimensions),
            "pairwise_dimensions": list(self.pairwise.pairwise_dimensions),
            "pairwise": "native" if self.pairwise is r else "bradley_terry",
            "differentiable": bool(r.differentiable),
            "requires_prompts": bool(r.requires_prompts),
            "requires_references": bool(r.requires_references),
            "min_frames": int(r.min_frames),
            "input_frames": r.input_frames,
            "input_size": None if size is None else list(size),
            "expected_fps": None if r.expected_fps is None else float(r.expected_fps),
            "expected_resolution": None if resolution is None else list(resolution),
            "score_ranges": {d: list(r.score_ranges[d]) if d in r.score_ranges else None for d in dims},
            "card": json.loads(json.dumps(r.card_data().to_dict(), default=str)),
            "limits": {"max_batch": self.max_batch, "max_pairs": self.max_pairs,
                       "max_request_bytes": self.max_request_bytes},
        }

    # -- requests (handler threads) ---------------------------------------------------------------------------------
    def handle(self, kind: str, body: bytes) -> tuple[int, dict]:
        """Check a request, queue it and wait for its answer: ``(status, JSON answer)``."""
        try:
            request = decode_request(body, kind, max_decoded_bytes=self.max_request_bytes)
            self._check(request)
        except WireError as err:
            return err.status, {"error": one_line(str(err))}
        except (TypeError, ValueError) as err:  # the reward's own input checks
            return 400, {"error": one_line(str(err))}
        r = request
        key = (kind, tuple(v.shape[1:] for v in r.videos), r.fps, r.prompts is None,
               None if r.references is None else tuple(r.references.shape[1:]))
        job = _Job(request, key)
        with self._cond:
            if self._closing:
                return 503, {"error": "the reward server is shutting down"}
            self._queue.append(job)
            self._cond.notify_all()
        job.done.wait()
        return job.status, job.answer

    def _check(self, request: Request) -> None:
        """The reward's input checks (frames, size, prompts, references), so a bad request fails alone with a 4xx."""
        cap = self.max_batch if request.kind == "score" else self.max_pairs
        what = "videos" if request.kind == "score" else "pairs"
        if request.size > cap:
            raise WireError(f"the request holds {request.size} {what}, more than this server scores in one call "
                            f"(max_batch={self.max_batch}: {cap} {what}); split it", status=413)
        for videos in request.videos:
            self.reward.check_inputs(videos, request.prompts, request.references)

    # -- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    for job in self._queue:
                        self._finish(job, 503, {"error": "the reward server is shutting down"})
                    self._queue.clear()
                    return
            time.sleep(BATCH_WAIT_S)
            with self._cond:
                group = self._take_group()
            try:
                self._run(group)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any failure, or requests would hang
                for job in group:
                    if not job.done.is_set():
                        self._finish(job, 500, {"error": one_line(f"the server failed: {type(err).__name__}: {err}")})

    def _take_group(self) -> list[_Job]:
        """The oldest queued job and the queued jobs that can share its reward call, removed from the queue."""
        first = self._queue[0]
        cap = self.max_batch if first.request.kind == "score" else self.max_pairs
        group, total = [], 0
        for job in self._queue:
            if job.key == first.key and total + job.request.size <= cap:
                group.append(job)
                total += job.request.size
        self._queue = [job for job in self._queue if job not in group]
        return group

    def _run(self, group: list[_Job]) -> None:
        try:
            values = self._call(group)
        except Exception as err:  # noqa: BLE001 - any reward failure is answered, and the server keeps serving
            if len(group) > 1:  # find the failing request: the others must not fail with it
                for job in group:
                    self._run([job])
                return
            self._finish(group[0], 500, {"error": one_line(f"the reward raised {type(err).__name__}: {err}")})
            return
        start = 0
        for job in group:
            end = start + job.request.size
            self._finish(job, 200, encode_result(job.request.kind, {k: v[start:end] for k, v in values.items()}))
            start = end

    def _call(self, group: list[_Job]) -> dict[str, Tensor]:
        """One reward call on the group's concatenated inputs; non-finite scores come back as NaN (the client masks
        those samples) instead of failing the whole batch."""
        first = group[0].request
        device = _device(self.reward)
        videos = [torch.cat([job.request.videos[i] for job in group]).to(device) for i in range(len(first.videos))]
        prompts = None if first.prompts is None else [p for job in group for p in job.request.prompts]
        references = None if first.references is None else \
            torch.cat([job.request.references for job in group]).to(device)
        with self._cond:
            self.reward_calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        with torch.no_grad():
            if first.kind == "score":
                try:
                    return self.reward(videos[0], prompts, references, fps=first.fps)
                except FloatingPointError:  # some samples scored NaN: keep the finite ones
                    scores = self.reward.forward(videos[0], prompts, references, **self.reward.fps_kwargs(first.fps))
                    return _with_nan(scores, self.reward.dimensions, videos[0].shape[0])
            try:
                return self.pairwise.compare(videos[0], videos[1], prompts, fps=first.fps)
            except FloatingPointError:
                probs = self.pairwise.forward_pair(videos[0], videos[1], prompts, first.fps)
                return _with_nan(probs, self.pairwise.pairwise_dimensions, videos[0].shape[0])

    @staticmethod
    def _finish(job: _Job, status: int, answer: dict) -> None:
        job.status, job.answer = status, answer
        job.done.set()


def _with_nan(values: dict[str, Tensor], dimensions: tuple[str, ...], n: int) -> dict[str, Tensor]:
    """Unchecked scores (some NaN) as float32, after the checks that do not concern NaN: the dimensions and shapes."""
    expected = {*dimensions, "overall"}
    if not isinstance(values, dict) or set(values) != expected:
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise KeyError(f"the reward returned dimensions {got}, expected {sorted(expected)}")
    for key, v in values.items():
        if not isinstance(v, Tensor) or v.shape != (n,):
            raise ValueError(f"the reward's {key!r} must be a Tensor of shape ({n},), got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    return {k: v.detach().float() for k, v in values.items()}


def _device(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """One connection: routes to the :class:`RewardServer` in ``self.server.app``; answers JSON, one line errors."""

    server_version = "reward-zoo"
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: the CLI prints the URL only
        pass

    def _send(self, status: int, answer: dict) -> None:
        data = (json.dumps(answer) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> bool:
        path = self.path.split("?", 1)[0]
        if path in ENDPOINTS[method]:
            return True
        other = "POST" if method == "GET" else "GET"
        if path in ENDPOINTS[other]:
            self._send(405, {"error": f"{method} {path} is not allowed; use {other} {path}"})
        else:
            known = ", ".join(f"{m} {p}" for m, paths in ENDPOINTS.items() for p in paths)
            self._send(404, {"error": f"unknown endpoint {method} {path}; the reward server answers {known}"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._route("GET"):
            return
        app: RewardServer = self.server.app
        self._send(200, {"status": "ok"} if self.path.startswith("/health") else app.info())

    def do_POST(self) -> None:  # noqa: N802
        if not self._route("POST"):
            return
        app: RewardServer = self.server.app
        with app._cond:
            app.requests += 1
        length = self.headers.get("Content-Length")
        if length is None:
            self._send(411, {"error": "POST needs a Content-Length header (the size of the safetensors body)"})
            return
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self._send(400, {"error": f"Content-Length must be a non-negative integer, got {length!r}"})
            return
        if size > app.max_request_bytes:  # refused before a byte of the body is read
            self._send(413, {"error": f"request body of {size} bytes exceeds max_request_bytes="
                                      f"{app.max_request_bytes}; send fewer videos per request (or MP4)"})
            return
        try:
            body = self.rfile.read(size)
        except (TimeoutError, OSError):
            self._send(408, {"error": f"the request body did not arrive within {READ_TIMEOUT_S:g} s"})
            return
        if len(body) < size:
            self._send(400, {"error": f"request body is truncated: got {len(body)} of the {size} bytes that "
                                      "Content-Length announced"})
            return
        try:
            status, answer = app.handle(self.path.split("?", 1)[0].lstrip("/"), body)
        except Exception as err:  # noqa: BLE001 - a bug must not drop the connection without an answer
            status, answer = 500, {"error": one_line(f"the server failed on this request: {type(err).__name__}: {err}")}
        self._send(status, answer)


def start_server(reward: RewardModel, host: str = "127.0.0.1", port: int = 0, max_batch: int = DEFAULT_MAX_BATCH,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, delay_s: float = 0.0, name: str | None = None,
                 allow_remote: bool = False) -> RewardServer:
    """Serve ``reward`` from background threads and return the running :class:`RewardServer` (``.url``,
    ``.close()``, a context manager). ``port=0`` picks a free port; ``delay_s`` sleeps before each reward call (to
    emulate a slow judge in benchmarks); ``host`` must be loopback unless ``allow_remote`` (see :func:`check_host`)."""
    return RewardServer(reward, host=host, port=port, max_batch=max_batch, max_request_bytes=max_request_bytes,
                        delay_s=delay_s, name=name, allow_remote=allow_remote)


def build_reward(spec: str, pretrained: bool | None = None) -> RewardModel:
    """The reward ``reward-zoo serve --reward SPEC`` serves: a registered name (with its shipped weights when they
    exist, unless ``pretrained=False``), ``hf-hub:org/repo``, a checkpoint folder, or a YAML/JSON config file holding
    ``{class_path, init_args}`` (as under ``reward:`` in a training config; a file with a top-level ``reward:``
    section works too)."""
    from pathlib import Path

    from reward_zoo.registry import HUB_PREFIX, PRETRAINED_DIR, create_reward

    path = Path(spec)
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
        if pretrained is not None:
            raise ValueError(f"--pretrained applies to a registered reward name, not to the config file {spec}")
        return _reward_from_config(path)
    is_name = not spec.startswith(HUB_PREFIX) and not path.is_dir()
    if is_name and pretrained is None:
        pretrained = (PRETRAINED_DIR / spec / "config.json").is_file()
    return create_reward(spec, pretrained=bool(pretrained) if is_name else False)


def _reward_from_config(path) -> RewardModel:
    import yaml
    from jsonargparse import ArgumentParser

    node = yaml.safe_load(path.read_text())
    if isinstance(node, dict) and "reward" in node and "class_path" not in node:
        node = node["reward"]
    if not (isinstance(node, dict) and "class_path" in node):
        raise ValueError(f"reward config {path} must hold {{class_path: ..., init_args: {{...}}}} (optionally under "
                         f"'reward:'), got {type(node).__name__}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardModel)
    reward = parser.instantiate(parser.parse_object({"reward": node})).reward
    return reward.eval()


def serve(reward: str | RewardModel, port: int, host: str = "127.0.0.1", max_batch: int = DEFAULT_MAX_BATCH,
          max_request_mb: float = DEFAULT_MAX_REQUEST_BYTES / 2**20, delay_s: float = 0.0,
          pretrained: bool | None = None, allow_remote: bool = False, device: str = "cpu",
          name: str | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (what ``reward-zoo serve`` runs): prints the URL, then shuts down cleanly.
    ``name`` (default: ``reward`` when it is a string) is what ``/info`` calls the reward."""
    import signal

    check_host(host, allow_remote)  # before a large judge loads
    model = build_reward(reward, pretrained) if isinstance(reward, str) else reward
    model = model.to(device).requires_grad_(False)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with start_server(model, host=host, port=port, max_batch=max_batch,
                          max_request_bytes=int(max_request_mb * 2**20), delay_s=delay_s,
                          name=name or (reward if isinstance(reward, str) else None),
                          allow_remote=allow_remote) as server:
            print(f"serving reward {server.name} at {server.url} (POST /score, /compare; GET /health, /info); "
                  f"Ctrl-C to stop", flush=True)
            try:
                while not stop.wait(0.2):
                    pass
            except KeyboardInterrupt:
                pass
        print("reward server stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
