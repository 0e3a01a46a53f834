"""Hub round trips against a local Hub server (tests/hub_server.py): rewards and pipelines download, cache, pin
revisions, fail clearly and push, through the real ``huggingface_hub``, ``transformers`` and ``diffusers`` code.

Nothing leaves 127.0.0.1: the client's endpoint points at the local server and its HTTP session refuses any
other host.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
from hub_server import HubServer, git_blob_id
from huggingface_hub import constants, set_client_factory
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._http import default_client_factory
from safetensors.torch import load_file

from reward_zoo import create_reward
from reward_zoo.aesthetic import LaionAesthetic
from reward_zoo.physics import NewtonReward


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running local Hub with the client pointed at it, a fresh cache and no stored token; stopped afterwards."""
    server = HubServer(tmp_path / "hub", max_lifetime=120).start()
    home = tmp_path / "hf-home"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    for name, value in {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,  # the real Hub's Xet storage is not served: large files take the LFS path
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / "agent_harnesses.json"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    host, port = server.url.rsplit("/", 1)[-1].split(":")

    def local_only(request) -> None:
        if (request.url.host, request.url.port) != (host, int(port)):
            raise RuntimeError(f"a test tried to reach {request.url}, outside the local hub {server.url}")

    def factory():
        client = default_client_factory()
        client.event_hooks["request"].append(local_only)
        client.timeout = 30.0
        return client

    set_client_factory(factory)
    try:
        yield server
    finally:
        server.stop()
        set_client_factory(default_client_factory)


def publish(hub: HubServer, tmp_path, repo_id: str, reward, message: str) -> str:
    folder = tmp_path / "publish" / message.replace(" ", "-")
    reward.save_pretrained(folder)
    return hub.commit(repo_id, folder, message)


def newton_files(hub: HubServer, repo_id: str) -> list[str]:
    return sorted(hub.store.tree(repo_id, hub.store.resolve(repo_id, "main")))


# -- download ---------------------------------------------------------------------------------------------------
def test_create_reward_downloads_config_card_and_weights(hub, tmp_path):
    sha = publish(hub, tmp_path, "org/newton", NewtonReward(gravity=0.01), "newton")
    reward = create_reward("hf-hub:org/newton")
    assert type(reward) is NewtonReward and reward.config["gravity"] == 0.01
    assert newton_files(hub, "org/newton") == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    gets = {path for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert gets == {f"/org/newton/resolve/{sha}/{name}" for name in ("README.md", "config.json", "model.safetensors")}
    snapshot = tmp_path / "hf-home" / "hub" / "models--org--newton" / "snapshots" / sha
    assert json.loads((snapshot / "config.json").read_text())["gravity"] == 0.01
    assert (tmp_path / "hf-home" / "hub" / "models--org--newton" / "refs" / "main").read_text() == sha
    # the cache keys blobs by ETag: the git blob id for regular files, the sha256 for LFS-tracked ones
    blobs = {p.name for p in (tmp_path / "hf-home" / "hub" / "models--org--newton" / "blobs").iterdir()}
    weights = (snapshot / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() in blobs
    assert git_blob_id((snapshot / "config.json").read_bytes()) in blobs
    assert hub.unhandled == []  # the client needed no other endpoint


def test_reward_with_weights_and_a_hub_backbone(hub, tmp_path):
    """laion_aesthetic: its head comes from the reward repo, its CLIP from another repo, both through the server."""
    from lit_videoalign.testing import write_tiny_clip

    write_tiny_clip(tmp_path / "clip", seed=5)
    clip_sha = hub.commit("org/tiny-clip", tmp_path / "clip", "tiny clip")
    reward = create_reward("laion_aesthetic", clip_model_name_or_path="org/tiny-clip", clip_revision=clip_sha)
    torch.nn.init.normal_(reward.head[0].weight)
    publish(hub, tmp_path, "org/aesthetic", reward, "aesthetic")
    loaded = create_reward("hf-hub:org/aesthetic")
    assert type(loaded) is LaionAesthetic and loaded.config == reward.config
    for key, value in reward.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    videos = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        # measured exact (torch 2.13.0 / 2.14.1)
        torch.testing.assert_close(loaded(videos)["overall"], reward(videos)["overall"])
    assert any(path.startswith(f"/org/tiny-clip/resolve/{clip_sha}/") for _, path in hub.requests)
    assert hub.unhandled == []  # the client needed no other endpoint


def test_second_load_comes_from_the_cache(hub, tmp_path, monkeypatch):
    publish(hub, tmp_path, "org/newton", NewtonReward(gravity=0.01), "newton")
    first = create_reward("hf-hub:org/newton")
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline mode: no request at all
    assert create_reward("hf-hub:org/newton").config == first.config
    with pytest.raises(LocalEntryNotFoundError, match="cannot find the requested files in the local cache"):
        create_reward("hf-hub:org/never-downloaded")
    assert len(hub.requests) == seen
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.stop()  # the server is gone: connections are refused and the client falls back to its cache
    assert create_reward("hf-hub:org/newton").config == first.config


def test_revision_pinning(hub, tmp_path):
    first = publish(hub, tmp_path, "org/newton", NewtonReward(gravity=0.01), "first")
    second = publish(hub, tmp_path, "org/newton", NewtonReward(gravity=0.02), "second")
    hub.store.tag("org/newton", "v1", first)
    assert hub.store.history("org/newton")[:2] == [second, first]
    assert create_reward("hf-hub:org/newton").config["gravity"] == 0.02
    assert create_reward("hf-hub:org/newton", revision=first).config["gravity"] == 0.01
    assert create_reward("hf-hub:org/newton", revision="v1").config["gravity"] == 0.01
    assert create_reward("hf-hub:org/newton", revision=second).config["gravity"] == 0.02
    with pytest.raises(RevisionNotFoundError, match="Revision Not Found"):
        create_reward("hf-hub:org/newton", revision="f" * 40)


def test_missing_repo_is_a_clear_error(hub):
    with pytest.raises(RepositoryNotFoundError, match="Repository Not Found for url: .*/org/missing/"):
        create_reward("hf-hub:org/missing")


def test_missing_file_is_a_clear_error(hub, tmp_path):
    NewtonReward().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    hub.commit("org/no-weights", tmp_path / "ckpt", "config and card only")
    with pytest.raises(EntryNotFoundError, match=r"Entry Not Found for url: .*/org/no-weights/.*model\.safetensors"):
        create_reward("hf-hub:org/no-weights")


# -- upload -----------------------------------------------------------------------------------------------------
def test_push_to_hub_round_trip(hub):
    reward = NewtonReward(gravity=0.03)
    with pytest.raises(HfHubHTTPError, match="401"):  # writes need the token
        reward.push_to_hub("org/pushed", token=False)
    assert not hub.store.exists("org/pushed")

    info = reward.push_to_hub("org/pushed", token=hub.token, commit_message="add newton")
    history = hub.store.history("org/pushed")
    assert len(history) == 2 and info.oid == history[0]
    assert hub.store.commit_info("org/pushed", history[0])["message"] == "add newton"
    assert newton_files(hub, "org/pushed") == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    card = hub.store.read_blob("org/pushed", hub.store.tree("org/pushed", history[0])["README.md"]).decode()
    assert "reward_class: reward_zoo.physics.NewtonReward" in card and "license: apache-2.0" in card
    loaded = create_reward("hf-hub:org/pushed")
    assert type(loaded) is NewtonReward and loaded.config == reward.config

    reward.push_to_hub("org/pushed", token=hub.token)  # nothing changed: the client skips the commit
    assert hub.store.history("org/pushed") == history
    NewtonReward(gravity=0.04).push_to_hub("org/pushed", token=hub.token)
    assert len(hub.store.history("org/pushed")) == 3
    assert create_reward("hf-hub:org/pushed", force_download=True).config["gravity"] == 0.04
    assert hub.unhandled == []  # the client needed no other endpoint


# -- pipelines --------------------------------------------------------------------------------------------------
def test_diffusers_backbone_loads_a_pinned_pipeline(hub, tmp_path):
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.testing import tiny_wan_pipeline

    first = hub.commit("org/tiny-wan", tiny_wan_pipeline(tmp_path / "wan0", seed=0), "seed 0")
    hub.commit("org/tiny-wan", tiny_wan_pipeline(tmp_path / "wan1", seed=1), "seed 1")
    backbone = DiffusersVideoBackbone("org/tiny-wan", revision=first)
    assert backbone._root.parts[-2:] == ("snapshots", first)
    expected = load_file(tmp_path / "wan0" / "transformer" / "diffusion_pytorch_model.safetensors")
    state = backbone.denoiser.state_dict()
    assert all(torch.equal(state[key], value) for key, value in expected.items())
    newest = load_file(tmp_path / "wan1" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(state[key], value) for key, value in newest.items())
    assert hub.unhandled == []  # the client needed no other endpoint


def test_server_lifetime_is_bounded(tmp_path):
    server = HubServer(tmp_path / "hub", max_lifetime=0.2).start()
    deadline = time.monotonic() + 10
    while server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.running
    server.stop()  # idempotent


# -- machine-readable cards and the large-file upload path ---------------------------------------------------------
def test_push_to_hub_sends_weights_through_lfs_and_uploads_metrics_and_card_facts(hub):
    """The large-file path of the real Hub, end to end through ``huggingface_hub`` (Xet disabled, see the fixture):

    preupload answers "lfs" for ``model.safetensors`` and "regular" for the rest; the client calls the LFS batch API
    (basic transfer), PUTs the object to the upload URL, POSTs the verify URL and commits an ``lfsFile`` line; the
    tree then lists it as an LFS file (``X-Linked-Etag`` on download). Pushing again uploads nothing: preupload
    reports the remote sha256 and the client skips the unchanged file. Not covered: multi-part transfers, Xet.
    """
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.utils import get_session

    reward = create_reward("physics_learned", pretrained=True)
    assert reward.metrics["val"]["dimensions"]["physics"]["acc"] > 0.9  # read from the shipped metrics.json
    reward.push_to_hub("org/physics", token=hub.token)
    sha = hub.store.resolve("org/physics", "main")
    tree = hub.store.tree("org/physics", sha)
    assert sorted(tree) == [".gitattributes", "README.md", "config.json", "metrics.json", "model.safetensors"]
    weights = hub.store.read_blob("org/physics", tree["model.safetensors"])
    assert tree["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()  # stored as an LFS file
    assert tree["metrics.json"]["sha256"] is None and tree["README.md"]["sha256"] is None  # regular files
    assert hub.lfs_uploads == [("org/physics", tree["model.safetensors"]["sha256"])]
    posts = [(m, p) for m, p in hub.requests if m in ("POST", "PUT")]
    assert ("POST", "/org/physics.git/info/lfs/objects/batch") in posts
    assert ("PUT", f"/lfs-upload/org/physics/{tree['model.safetensors']['sha256']}") in posts
    assert ("POST", "/lfs-verify/org/physics") in posts

    loaded = create_reward("hf-hub:org/physics")
    assert loaded.metrics == reward.metrics
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reward.state_dict().items())
    card = ModelCard.load(hf_hub_download("org/physics", "README.md")).data.to_dict()
    assert card["dimensions"] == ["physics", "overall"] and card["score_ranges"]["physics"] == [None, None]
    assert card["differentiable"] is True and card["expected_fps"] == 8.0 and card["expected_resolution"] == [32, 32]
    results = {r["dataset"]["split"]: r["metrics"] for r in card["model-index"][0]["results"]}
    assert results["validation"][0] == {"type": "accuracy", "name": "physics pairwise accuracy (strict pairs)",
                                        "value": reward.metrics["val"]["dimensions"]["physics"]["acc"]}

    reward.push_to_hub("org/physics", token=hub.token)  # unchanged: no commit, no second upload
    assert hub.store.resolve("org/physics", "main") == sha and len(hub.lfs_uploads) == 1
    assert hub.unhandled == []

    # a weights file sent as a regular (base64) upload is refused, as the Hub refuses it
    lines = [{"key": "header", "value": {"summary": "sneak", "description": ""}},
             {"key": "file", "value": {"path": "other.safetensors", "encoding": "base64", "content": "AAAA"}}]
    auth = {"Authorization": f"Bearer {hub.token}"}
    answer = get_session().post(f"{hub.url}/api/models/org/physics/commit/main", headers=auth,
                                content="\n".join(map(json.dumps, lines)))
    assert answer.status_code == 400 and "tracked by LFS" in answer.headers["X-Error-Message"]


def test_a_reward_without_metrics_has_card_facts_and_no_metrics_file(tmp_path):
    from huggingface_hub import ModelCard

    NewtonReward().save_pretrained(tmp_path / "newton")
    assert not (tmp_path / "newton" / "metrics.json").exists()
    card = ModelCard.load(tmp_path / "newton" / "README.md").data.to_dict()
    assert card["dimensions"] == ["acceleration", "continuity", "mass", "energy", "overall"]
    assert card["score_ranges"] == {d: [0.0, 1.0] for d in card["dimensions"]} and "model-index" not in card
    assert card["min_frames"] == 4 and card["requires_prompts"] is False and "expected_resolution" not in card


@pytest.mark.parametrize("name", ["identity", "physics_learned", "quality"])
def test_shipped_cards_carry_their_facts_and_accuracies_in_the_yaml_header(name):
    """The shipped cards' headers are what the code writes today (regenerate them with ``card_data`` if not)."""
    from huggingface_hub import ModelCard

    from reward_zoo.registry import PRETRAINED_DIR

    reward = create_reward(name, pretrained=True)
    header = ModelCard.load(PRETRAINED_DIR / name / "README.md").data.to_dict()
    assert header == reward.card_data(name=name).to_dict()
    metrics = json.loads((PRETRAINED_DIR / name / "metrics.json").read_text())
    results = {r["dataset"]["split"]: {m["name"]: m["value"] for m in r["metrics"]}
               for r in header["model-index"][0]["results"]}
    for dim in reward.dimensions:
        val, test = metrics["val"]["dimensions"][dim], metrics["test"]["dimensions"][dim]
        assert results["validation"][f"{dim} pairwise accuracy (strict pairs)"] == val["acc"]
        assert results["test"][f"{dim} accuracy with ties"] == test["acc_ties"]
    assert header["dimensions"] == [*reward.dimensions, "overall"] and header["expected_resolution"] == [32, 32]


def test_a_trained_reward_export_writes_its_accuracies_into_the_card(tmp_path):
    """``RewardTraining.save_pretrained`` (what ``reward-zoo fit`` exports) puts its metrics into ``model-index``."""
    from huggingface_hub import ModelCard

    from reward_zoo.registry import PRETRAINED_DIR
    from reward_zoo.training import RewardTraining

    training = RewardTraining(create_reward("physics_learned"))
    training.metrics = json.loads((PRETRAINED_DIR / "physics_learned" / "metrics.json").read_text())
    training.save_pretrained(tmp_path / "mine")
    card = ModelCard.load(tmp_path / "mine" / "README.md").data.to_dict()
    assert card["model-index"][0]["name"] == "mine" and card["differentiable"] is True
    assert create_reward(str(tmp_path / "mine")).metrics == training.metrics
