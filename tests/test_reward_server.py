"""reward_zoo.server and the ``remote`` reward over real HTTP on 127.0.0.1: scores and pairwise probabilities equal
in-process ones (tensor and MP4 transports), concurrent requests are batched, every bad request gets its 4xx and the
server keeps serving, the client's errors name the URL, and a GRPO run outlives a server that goes away."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import lightning as L
import pytest
import torch
from safetensors.torch import save as save_safetensors

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.testing import Brightness
from reward_zoo import create_reward
from reward_zoo.pairwise import PairwiseReward, bt_pairwise
from reward_zoo.remote import RemoteReward, RemoteRewardError
from reward_zoo.server import build_reward, start_server
from reward_zoo.wire import encode_request, quantize

WORLD = ToyWorld()
# Rewards scored through the server run the same ops on the same inputs as in-process, but batched matmuls may take
# another kernel path in the server's worker thread: allow float32 rounding, nothing more.
TOL = dict(rtol=1e-5, atol=1e-6)


def toy(n: int, first_seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``n`` toy-world videos ``(n, 16, 3, 32, 32)`` and their prompts."""
    examples = [WORLD.example(first_seed + i) for i in range(n)]
    return torch.stack([e.video for e in examples]), [e.prompt for e in examples]


class Counting(Brightness):
    """Brightness that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, videos, prompts=None, references=None):
        self.batches.append(videos.shape[0])
        return super().forward(videos, prompts, references)


class Prompted(Brightness):
    requires_prompts = True


class Flaky(Brightness):
    """Raises on its first ``failures`` calls, then scores."""

    def __init__(self, failures: int = 10**9) -> None:
        super().__init__()
        self.failures = failures

    def forward(self, videos, prompts=None, references=None):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("judge exploded")
        return super().forward(videos, prompts, references)


class SharpJudge(Brightness, PairwiseReward):
    """A native pairwise judge that is not Bradley-Terry of its pointwise scores."""

    pairwise_dimensions = ("brightness",)

    def forward_pair(self, videos_a, videos_b, prompts, fps):
        p = torch.sigmoid(10 * (videos_a.mean((1, 2, 3, 4)) - videos_b.mean((1, 2, 3, 4))))
        return {"brightness": p, "overall": p}


@contextmanager
def recording(reward):
    """The videos ``reward`` is called with meanwhile (on the server's worker thread)."""
    seen = []
    handle = reward.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def newton():
    return create_reward("newton")


@pytest.fixture(scope="module")
def quality():
    return create_reward("quality", pretrained=True)  # shipped weights; requires prompts


def request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, path, body=body)
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    return status, answer


def raw(url: str, data: bytes, shutdown: bool = False) -> tuple[int, dict]:
    """Send ``data`` on a bare socket (optionally closing the sending side) and parse the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def assert_healthy(url: str) -> None:
    assert request(url, "GET", "/health") == (200, {"status": "ok"})


# -- parity with in-process scoring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["newton", "quality"])
def test_scores_through_the_server_equal_in_process_scores(name, newton, quality):
    reward = {"newton": newton, "quality": quality}[name]
    videos, prompts = toy(4)
    with start_server(reward) as server:
        exact = create_reward("remote", url=server.url, video_dtype="float32")
        assert isinstance(exact, RemoteReward) and exact.dimensions == reward.dimensions
        torch.testing.assert_close(exact(videos, prompts, fps=8.0), reward(videos, prompts, fps=8.0), **TOL)
        # uint8 (the default) quantises to 0..255: the same as scoring the quantised videos in-process
        remote = create_reward("remote", url=server.url)
        torch.testing.assert_close(remote(videos, prompts, fps=8.0), reward(quantize(videos), prompts, fps=8.0), **TOL)
        # MP4 is lossy (H.264, and libx264 here is not bit-reproducible from run to run): the server scores what it
        # decoded, which is close to the videos sent
        mp4 = create_reward("remote", url=server.url, transport="mp4")
        with recording(reward) as seen:
            scores = mp4(videos, prompts, fps=8.0)
        (decoded,) = seen
        assert 0 < (decoded - videos).abs().max() < 0.25 and (decoded - videos).abs().mean() < 0.01
        torch.testing.assert_close(scores, reward(decoded, prompts, fps=8.0), **TOL)


def test_compare_equals_bt_pairwise_in_process_and_native_judges_use_their_own(newton):
    videos, _ = toy(6)
    a, b = videos[:3], videos[3:]
    with start_server(newton) as server:
        remote = create_reward("remote", url=server.url, video_dtype="float32")
        assert remote.server_info["pairwise"] == "bradley_terry"
        torch.testing.assert_close(remote.compare(a, b, fps=8.0), bt_pairwise(newton).compare(a, b, fps=8.0), **TOL)
        mp4 = create_reward("remote", url=server.url, transport="mp4")
        with recording(newton) as seen:
            probs = mp4.compare(a, b, fps=8.0)
        (both,) = seen  # Bradley-Terry scores a and b in one call
        torch.testing.assert_close(probs, bt_pairwise(newton).compare(both[:3], both[3:], fps=8.0), **TOL)
        with pytest.raises(ValueError, match="videos_a has 2 items but videos_b has 3"):
            remote.compare(a[:2], b)
    judge = SharpJudge()
    dim, bright = torch.full((2, 4, 3, 8, 8), 0.4), torch.full((2, 4, 3, 8, 8), 0.6)
    with start_server(judge) as server:
        remote = create_reward("remote", url=server.url)
        assert remote.server_info["pairwise"] == "native" and remote.pairwise_dimensions == ("brightness",)
        probs = remote.compare(bright, dim)
        torch.testing.assert_close(probs, judge.compare(bright, dim), **TOL)
        assert not torch.allclose(probs["overall"], bt_pairwise(judge).compare(bright, dim)["overall"])


def test_info_reports_the_reward_card_and_limits(quality):
    with start_server(quality, name="quality", max_batch=4) as server:
        status, info = request(server.url, "GET", "/info")
        assert status == 200 and info["name"] == "quality" and info["class"] == "reward_zoo.quality.QualityReward"
        assert info["dimensions"] == list(quality.dimensions) and info["pairwise_dimensions"] == info["dimensions"]
        assert info["requires_prompts"] is True and info["expected_fps"] == 8.0 and info["differentiable"] is True
        assert info["card"]["reward_class"] == "reward_zoo.quality.QualityReward" and "model-index" in info["card"]
        assert info["limits"] == {"max_batch": 4, "max_pairs": 2, "max_request_bytes": server.max_request_bytes}
        remote = create_reward("remote", url=server.url)
        assert remote.requires_prompts and remote.expected_fps == 8.0 and remote.differentiable is False
        assert remote.score_ranges == {d: tuple(r) for d, r in quality.score_ranges.items()}
        with pytest.raises(ValueError, match="needs prompts"):  # checked on the client, as in-process
            remote(toy(1)[0])


# -- batching -------------------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_each_gets_its_own_scores():
    reward = Counting()
    clips = [torch.full((1, 4, 3, 8, 8), (i + 1) / 10) for i in range(6)]
    results: dict[int, dict] = {}
    with start_server(reward, max_batch=4, delay_s=0.5) as server:
        remote = create_reward("remote", url=server.url, video_dtype="float32")
        barrier = threading.Barrier(len(clips))

        def client(i: int) -> None:
            barrier.wait()
            results[i] = remote(clips[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clips))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert server.requests == len(clips)
        assert server.reward_calls < len(clips) and max(reward.batches) <= 4 and max(reward.batches) > 1
    for i, clip in enumerate(clips):
        torch.testing.assert_close(results[i]["overall"], Brightness()(clip)["overall"], **TOL)


def test_the_client_splits_batches_larger_than_the_servers_max_batch():
    reward = Counting()
    videos = torch.rand(5, 4, 3, 8, 8)
    with start_server(reward, max_batch=2) as server:
        scores = create_reward("remote", url=server.url, video_dtype="float32")(videos)
        assert reward.batches == [2, 2, 1]
    torch.testing.assert_close(scores, Brightness()(videos), **TOL)


# -- bad requests ---------------------------------------------------------------------------------------------------
def body(tensors: dict, prompts=None, fps=None, request_json: str | None = None) -> bytes:
    meta = request_json if request_json is not None else json.dumps({"prompts": prompts, "fps": fps})
    return save_safetensors(tensors, metadata={"request": meta})


U8 = torch.full((2, 4, 3, 8, 8), 128, dtype=torch.uint8)
GOOD = body({"videos": U8}, prompts=["a", "b"])
BAD_REQUESTS = {  # name: (method, path, body, status, message)
    "truncated body": ("POST", "/score", GOOD[:-7], 400, "truncated: tensor 'videos' ends at byte"),
    "not safetensors": ("POST", "/score", b"\x05\x00\x00\x00\x00\x00\x00\x00hello", 400, "header is not JSON"),
    "wrong dtype": ("POST", "/score", body({"videos": U8.half()}, ["a", "b"]), 400, "dtype F16, expected U8"),
    "int dtype": ("POST", "/score", body({"videos": U8.short()}, ["a", "b"]), 400, "dtype I16, expected U8"),
    "wrong ndim": ("POST", "/score", body({"videos": U8[0]}, ["a", "b"]), 400, r"4 dimensions .* expected 5"),
    "0 frames": ("POST", "/score", body({"videos": U8[:, :0]}, ["a", "b"]), 400, "0 frames"),
    "missing prompt": ("POST", "/score", body({"videos": U8}), 400, "needs prompts, got prompts=None"),
    "prompt count": ("POST", "/score", body({"videos": U8}, ["a"]), 400, "1 prompts for 2 videos"),
    "mismatched pairs": ("POST", "/compare", body({"videos_a": U8, "videos_b": U8[:1].clone()}, ["a", "b"]), 400,
                         "videos_a has 2 videos but videos_b has 1"),
    "out of range": ("POST", "/score", body({"videos": U8.float()}, ["a", "b"]), 400, r"values must lie in \[0, 1\]"),
    "4 channels": ("POST", "/score", body({"videos": torch.zeros(2, 4, 4, 8, 8, dtype=torch.uint8)}, ["a", "b"]), 400,
                   "3 channels"),
    "unknown tensor": ("POST", "/score", body({"video": U8}, ["a", "b"]), 400, "unexpected tensor 'video'"),
    "metadata not JSON": ("POST", "/score", body({"videos": U8}, request_json="{prompts"), 400, "is not JSON"),
    "bad fps": ("POST", "/score", body({"videos": U8}, ["a", "b"], fps=-1), 400, "fps must be a positive number"),
    "corrupt mp4": ("POST", "/score", body({"mp4_0": torch.arange(200, dtype=torch.uint8)}, ["a"]), 400,
                    "mp4_0 is not a decodable MP4"),
    "too many videos": ("POST", "/score", body({"videos": U8.repeat(3, 1, 1, 1, 1)}, ["a"] * 6), 413,
                        "holds 6 videos, more than .*max_batch=4"),
    "unknown endpoint": ("GET", "/scores", None, 404, "unknown endpoint GET /scores"),
    "unknown post endpoint": ("POST", "/judge", GOOD, 404, "unknown endpoint POST /judge"),
    "wrong method": ("GET", "/score", None, 405, "use POST /score"),
}


@pytest.fixture(scope="module")
def prompted_server():
    with start_server(Prompted(), max_batch=4, max_request_bytes=1 << 20) as server:
        yield server


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(case, prompted_server):
    method, path, data, status, message = BAD_REQUESTS[case]
    calls = prompted_server.reward_calls
    got, answer = request(prompted_server.url, method, path, data)
    assert got == status and re.search(message, answer["error"]), answer
    assert "\n" not in answer["error"] and prompted_server.reward_calls == calls  # never reached the reward
    assert_healthy(prompted_server.url)
    assert request(prompted_server.url, "POST", "/score", GOOD)[0] == 200


def test_oversized_short_and_lengthless_bodies_are_refused_before_reading(prompted_server):
    url = prompted_server.url
    head = "POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
    status, answer = raw(url, head.format(10**12).encode())  # no body sent: answered from the header alone
    assert status == 413 and "exceeds max_request_bytes=1048576" in answer["error"]
    status, answer = raw(url, head.format(len(GOOD)).encode() + GOOD[:100], shutdown=True)
    assert status == 400 and f"got 100 of the {len(GOOD)} bytes" in answer["error"]
    status, answer = raw(url, b"POST /score HTTP/1.0\r\n\r\n")
    assert status == 411 and "Content-Length" in answer["error"]
    assert_healthy(url)


def test_a_raising_reward_answers_500_and_the_server_keeps_serving():
    with start_server(Flaky(), max_batch=8) as server:
        status, answer = request(server.url, "POST", "/score", body({"videos": U8}))
        assert status == 500 and answer["error"] == "the reward raised RuntimeError: judge exploded"
        assert_healthy(server.url)


class PoisonedByBlack(Counting):
    """Raises on any batch holding an all-black video."""

    def forward(self, videos, prompts=None, references=None):
        scores = super().forward(videos, prompts, references)
        if (videos.amax((1, 2, 3, 4)) == 0).any():
            raise RuntimeError("black video")
        return scores


def test_a_request_that_makes_a_batched_call_raise_fails_alone():
    reward = PoisonedByBlack()
    grey, black = torch.full((1, 4, 3, 8, 8), 0.5), torch.zeros(1, 4, 3, 8, 8)
    clips = {"grey1": grey, "black": black, "grey2": grey}
    answers = {}
    with start_server(reward, delay_s=0.5) as server:
        barrier = threading.Barrier(len(clips))

        def client(name: str) -> None:
            barrier.wait()
            answers[name] = request(server.url, "POST", "/score", body({"videos": clips[name]}))

        threads = [threading.Thread(target=client, args=(name,)) for name in clips]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert max(reward.batches) >= 2  # the black video shared a call, which raised; then each was scored alone
    assert answers["black"] == (500, {"error": "the reward raised RuntimeError: black video"})
    assert answers["grey1"] == answers["grey2"] == (200, {"scores": {"brightness": [0.5], "overall": [0.5]}})


class NaNForOddItems(Brightness):
    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4)).clone()
        b[1::2] = float("nan")
        return {"brightness": b, "overall": b}


def test_nan_scores_come_back_as_nan_for_those_samples_only():
    videos = torch.rand(4, 4, 3, 8, 8)
    with start_server(NaNForOddItems()) as server:
        remote = create_reward("remote", url=server.url, video_dtype="float32")
        scores = remote.forward(videos)  # what guarded_scores falls back to: the finite samples survive
        assert torch.isnan(scores["overall"][1::2]).all()
        torch.testing.assert_close(scores["overall"][::2], videos[::2].mean((1, 2, 3, 4)), **TOL)
        with pytest.raises(FloatingPointError, match=r"at batch items \[1, 3\]"):  # the checked call, as in-process
            remote(videos)


def test_non_loopback_hosts_are_refused_without_allow_remote():
    with pytest.raises(ValueError, match="not a loopback address.*--allow_remote"):
        start_server(Brightness(), host="0.0.0.0")


# -- client errors --------------------------------------------------------------------------------------------------
def test_refused_connection_and_a_server_killed_mid_run_raise_connection_error_naming_the_url():
    videos = torch.rand(2, 4, 3, 8, 8)
    server = start_server(Brightness())
    remote = create_reward("remote", url=server.url, retries=1, backoff_s=0.01)
    assert remote(videos)["overall"].shape == (2,)
    server.close()
    with pytest.raises(ConnectionError, match=re.escape(f"reward server {server.url} is not reachable") +
                       r".*after 2 attempt.*reward-zoo serve --reward NAME_OR_CONFIG --port"):
        remote(videos)
    with pytest.raises(ConnectionError, match=re.escape(server.url)):  # down at construction: fails before a run
        create_reward("remote", url=server.url, retries=0)


def test_timeouts_5xx_retries_and_4xx_are_reported_with_the_url():
    videos = torch.rand(2, 4, 3, 8, 8)
    with start_server(Brightness(), delay_s=1.0) as server:
        remote = create_reward("remote", url=server.url, timeout_s=0.2, retries=3)
        with pytest.raises(TimeoutError, match=re.escape(server.url) + ".*within timeout_s=0.2; raise timeout_s"):
            remote(videos)
        assert server.requests == 1  # a timeout is not retried: the server may still be scoring
    with start_server(Flaky()) as server:
        remote = create_reward("remote", url=server.url, retries=2, backoff_s=0.01)
        with pytest.raises(RemoteRewardError, match=re.escape(server.url) + r"/score failed \(500: the reward raised "
                           r"RuntimeError: judge exploded\) after 3 attempt"):
            remote(videos)
        assert server.reward_calls == 3  # bounded retries
    with start_server(Flaky(failures=1)) as server:  # a transient 5xx is retried away
        remote = create_reward("remote", url=server.url, retries=1, backoff_s=0.01)
        torch.testing.assert_close(remote(videos, fps=8.0), Brightness()(quantize(videos)), **TOL)
        assert server.reward_calls == 2
    with start_server(Prompted()) as server:
        remote = create_reward("remote", url=server.url, retries=3)
        with pytest.raises(ValueError, match=re.escape(server.url) + r"/score refused the request \(400\): .*prompts"):
            remote.forward(videos)  # past the client's own checks: the server refuses, and is not asked again
        assert server.requests == 1


def test_the_remote_reward_is_not_differentiable_and_says_so():
    with start_server(Brightness()) as server:  # a differentiable reward, but not through HTTP
        remote = create_reward("remote", url=server.url)
        assert remote.differentiable is False
        videos = torch.rand(1, 4, 3, 8, 8, requires_grad=True)
        with pytest.raises(RuntimeError, match="gradients cannot flow through a remote reward"):
            remote(videos)
        with torch.no_grad():
            assert remote(videos)["overall"].shape == (1,)


# -- in training ----------------------------------------------------------------------------------------------------
class CloseAfterFirstBatch(L.Callback):
    def __init__(self, server) -> None:
        self.server = server

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.server.close()


def test_grpo_outlives_a_server_that_goes_away_by_masking_the_failed_batches(tiny_pixel_pipeline):
    server = start_server(Brightness())
    remote = create_reward("remote", url=server.url, retries=1, backoff_s=0.01)
    model = GRPO(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), reward=remote, lora_rank=4,
                 group_size=2, num_sampling_steps=1, num_inference_steps=1)
    prompts = torch.utils.data.DataLoader([{"prompt": p} for p in ["a red ball falls", "a blue ball moves left"] * 2],
                                          batch_size=1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CloseAfterFirstBatch(server)])
    try:
        with pytest.warns(UserWarning, match=re.escape(f"GRPO: the reward raised ConnectionError: reward server "
                                                       f"{server.url} is not reachable")):
            trainer.fit(model, prompts)
    finally:
        server.close()
    assert trainer.state.finished and server.reward_calls == 1  # one scored batch, then two masked ones
    assert trainer.global_step == 1 and model.nonfinite_skips == 2
    assert trainer.callback_metrics["train/masked_samples"] == 2  # the last batch: both samples of its group
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- building and the CLI -------------------------------------------------------------------------------------------
def test_serve_builds_a_reward_from_a_config_file(tmp_path):
    config = tmp_path / "judge.yaml"
    config.write_text("reward:\n  class_path: reward_zoo.physics.NewtonReward\n"
                      "  init_args: {acceleration_tolerance: 0.03}\n")
    assert build_reward(str(config)).config["acceleration_tolerance"] == 0.03
    assert type(build_reward("quality")).__name__ == "QualityReward"  # shipped weights by default


def test_reward_zoo_serve_finds_shipped_reward_specs_by_name(monkeypatch):
    from reward_zoo import server as server_module
    from reward_zoo.cli import main

    served = {}
    monkeypatch.setattr(server_module, "serve", lambda reward, **kwargs: served.update(reward=reward, **kwargs))
    main(["serve", "--reward", "rewards/vlm_judge_videoscore2", "--port", "0", "--max_batch", "2"])
    assert served["reward"].endswith("reward_zoo/configs/vlm_judge_videoscore2.yaml") and served["max_batch"] == 2
    assert served["name"] == "rewards/vlm_judge_videoscore2" and served["allow_remote"] is False
    with pytest.raises(ValueError, match="no shipped config of that name .closest: rewards/vlm_judge_videoscore2"):
        main(["serve", "--reward", "rewards/vlm_judge_videoscor", "--port", "0"], exit_on_error=False)


def test_reward_zoo_serve_prints_its_url_and_stops_cleanly_on_sigterm():
    cmd = [sys.executable, "-m", "reward_zoo.cli", "serve", "--reward", "newton", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        assert_healthy(url)
        assert request(url, "GET", "/info")[1]["name"] == "newton"
        status, answer = request(url, "POST", "/score", encode_request("score", (torch.rand(1, 4, 3, 8, 8),)))
        assert status == 200 and set(answer["scores"]) == {"acceleration", "continuity", "mass", "energy", "overall"}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "reward server stopped" in out
