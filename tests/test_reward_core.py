"""reward_zoo core: RewardModel checks, registry, Hub I/O, CompositeReward and the preference losses."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import reward_zoo
from reward_zoo import (
    CompositeReward,
    RewardModel,
    bradley_terry_loss,
    bradley_terry_ties_loss,
    create_reward,
    get_reward_class,
    is_reward,
    list_rewards,
    register_reward,
    registry,
    reward_info,
)
from reward_zoo.composite import batch_rank, zscore
from reward_zoo.physics import NewtonReward


class Brightness(RewardModel):
    """Mean brightness times a learnable scale: a tiny reward with one weight, for the tests."""

    dimensions = ("brightness",)
    differentiable = True

    def __init__(self, scale: float = 1.0, hidden: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.proj.weight.fill_(scale / hidden)
            self.proj.bias.zero_()

    def forward(self, videos: Tensor, prompts=None, references=None) -> dict[str, Tensor]:
        mean = videos.mean((1, 2, 3, 4))  # (b,)
        score = self.proj(mean[:, None].expand(-1, self.proj.in_features)).squeeze(-1)
        return {"brightness": score, "overall": score}


class NeedsEverything(Brightness):
    requires_prompts = True
    requires_references = True
    input_frames = 4
    input_size = (8, 8)


class Broken(Brightness):
    """Returns NaN for the second video in 'brightness', or drops a dimension when asked."""

    def __init__(self, mode: str = "nan") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, videos, prompts=None, references=None):
        scores = super().forward(videos)
        if self.mode == "nan":
            scores["brightness"] = scores["brightness"].clone()
            scores["brightness"][1] = float("nan")
        elif self.mode == "missing":
            del scores["brightness"]
        elif self.mode == "shape":
            scores["overall"] = scores["overall"][:, None]
        return scores


def videos(b: int = 2, t: int = 4, h: int = 8, w: int = 8) -> Tensor:
    return torch.rand(b, t, 3, h, w)


# -- input and score checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.rand(4, 3, 8, 8), ValueError, r"\[B, T, C, H, W\]"),
        (torch.rand(2, 4, 1, 8, 8), ValueError, "3 channels"),
        ((torch.rand(2, 4, 3, 8, 8) * 255).to(torch.uint8), TypeError, "floating-point"),
        (torch.rand(2, 4, 3, 8, 8) * 2, ValueError, r"\[0, 1\]"),
        (torch.full((2, 4, 3, 8, 8), float("nan")), ValueError, "NaN"),
        ([[0.5]], TypeError, "torch.Tensor"),
        (torch.rand(0, 4, 3, 8, 8), ValueError, "empty batch"),
    ],
)
def test_bad_videos_raise(bad, error, match):
    with pytest.raises(error, match=match):
        Brightness()(bad)


def test_prompt_and_reference_checks():
    reward = NeedsEverything()
    v, refs = videos(), torch.rand(2, 3, 8, 8)
    assert set(reward(v, ["a", "b"], refs)) == {"brightness", "overall"}
    with pytest.raises(ValueError, match="needs prompts"):
        reward(v, None, refs)
    with pytest.raises(ValueError, match="needs them"):
        reward(v, ["a", "b"], None)
    with pytest.raises(ValueError, match="videos has 2 items but prompts has 3"):
        reward(v, ["a", "b", "c"], refs)
    with pytest.raises(ValueError, match=r"videos has 2 items but references has shape \(3, 3, 8, 8\)"):
        reward(v, ["a", "b"], torch.rand(3, 3, 8, 8))
    with pytest.raises(TypeError, match="list of strings"):
        reward(v, "a b", refs)
    with pytest.raises(ValueError, match="references"):
        reward(v, ["a", "b"], torch.rand(2, 3, 8, 8) + 1)
    with pytest.raises(ValueError, match="expects 4 frames, got 5"):
        reward(videos(t=5), ["a", "b"], refs)
    with pytest.raises(ValueError, match=r"expects frames of size \(8, 8\)"):
        reward(videos(h=16), ["a", "b"], refs)
    # a reward that needs no prompts still accepts (and ignores) them, but checks their count
    assert Brightness()(v, ["a", "b"])["overall"].shape == (2,)


def test_min_frames_check():
    class TwoFrames(Brightness):
        min_frames = 2

    with pytest.raises(ValueError, match="at least 2 frames"):
        TwoFrames()(videos(t=1))


@pytest.mark.parametrize(("mode", "error", "match"), [
    ("nan", FloatingPointError, r"dimension 'brightness' at batch items \[1\]"),
    ("missing", KeyError, "expected"),
    ("shape", ValueError, r"'overall' must be a Tensor of shape \(2,\)"),
])
def test_bad_scores_raise(mode, error, match):
    with pytest.raises(error, match=match):
        Broken(mode)(videos())


def test_gradients_flow_through_the_checks():
    v = videos().requires_grad_(True)
    Brightness()(v)["overall"].sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_config_is_json_of_the_init_args():
    reward = Brightness(scale=2.0)
    assert reward.config == {"scale": 2.0, "hidden": 2}
    assert json.loads(json.dumps(reward.config)) == reward.config
    with pytest.raises(TypeError, match="'scale' must be JSON-serialisable"):
        Brightness(scale=torch.tensor(1.0))
    with pytest.raises(TypeError, match="default for 'layer' must be JSON-serialisable"):
        class BadDefault(Brightness):  # noqa: F841
            def __init__(self, layer: object = object()) -> None:
                super().__init__()


# -- registry ------------------------------------------------------------------------------------------------
@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test disappear after it."""
    registry._import_families()
    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


def test_list_rewards_by_family():
    names = list_rewards()
    assert {"newton", "subject_consistency", "flicker", "dynamic_degree"} <= set(names)
    assert names == sorted(names)
    assert "newton" in list_rewards("physics") and "flicker" not in list_rewards("physics")
    assert list_rewards("temporal") == ["dynamic_degree", "flicker", "subject_consistency"]
    with pytest.raises(ValueError, match="unknown reward family 'phyics'; known families: .*'physics'"):
        list_rewards("phyics")


def test_reward_info_and_get_reward_class(tmp_path, monkeypatch):
    """The public, timm-style view of the registry (what ``reward-zoo list`` prints)."""
    assert get_reward_class("newton") is NewtonReward and is_reward("newton") and not is_reward("newtonn")
    info = reward_info("newton")
    assert json.loads(json.dumps(info)) == info  # JSON-serialisable
    assert info == {"name": "newton", "family": "physics",
                    "dimensions": ["acceleration", "continuity", "mass", "energy"], "differentiable": True,
                    "requires_prompts": False, "requires_references": False, "min_frames": 4,
                    "license": "apache-2.0", "paper_url": "https://arxiv.org/abs/2512.00425", "pretrained": False}
    assert reward_info("quality")["requires_prompts"] and reward_info("quality")["pretrained"]
    create_reward("flicker").save_pretrained(tmp_path / "flicker")  # shipped weights: the model card's licence wins
    card = tmp_path / "flicker" / "README.md"
    card.write_text(card.read_text().replace("license: apache-2.0", "license: mit"))
    monkeypatch.setattr(registry, "PRETRAINED_DIR", tmp_path)
    assert reward_info("flicker")["pretrained"] and reward_info("flicker")["license"] == "mit"
    for lookup in (get_reward_class, reward_info):
        with pytest.raises(ValueError, match=r"unknown reward 'flickr'; did you mean \['flicker'"):
            lookup("flickr")


def test_reward_info_of_a_factory(scratch_registry):
    @register_reward("test_factory_info")
    def factory(**kwargs):
        return Brightness(**kwargs)

    assert get_reward_class("test_factory_info") is factory
    info = reward_info("test_factory_info")
    assert info["family"] == __name__.rsplit(".", 1)[-1] and info["dimensions"] is None and not info["pretrained"]


def test_create_reward_by_name_and_close_matches():
    reward = create_reward("flicker", grid=None)  # None kwargs are dropped, timm-style
    assert isinstance(reward, RewardModel) and reward.config == {"grid": 4}
    assert create_reward("flicker", grid=2).grid == 2
    assert reward.family == "temporal" and create_reward("newton").family == "physics"
    with pytest.raises(ValueError, match=r"unknown reward 'newtonn'; did you mean \['newton'\]"):
        create_reward("newtonn")
    with pytest.raises(ValueError, match="unknown reward 'zzz'; available"):
        create_reward("zzz")


def test_pretrained_without_shipped_weights_raises():
    with pytest.raises(FileNotFoundError, match="no pretrained weights ship for reward 'newton'"):
        create_reward("newton", pretrained=True)


def test_pretrained_loads_shipped_weights(tmp_path, monkeypatch):
    """Shipped checkpoints live in ``reward_zoo/pretrained/<name>/`` in the exact Hub layout."""
    create_reward("flicker", grid=2).save_pretrained(tmp_path / "flicker")
    monkeypatch.setattr(registry, "PRETRAINED_DIR", tmp_path)
    assert create_reward("flicker", pretrained=True).grid == 2
    assert create_reward("flicker", pretrained=True, grid=3).grid == 3  # kwargs override the shipped config


def test_register_reward(scratch_registry):
    @register_reward("test_brightness")
    class Registered(Brightness):
        pass

    assert "test_brightness" in list_rewards()
    family = __name__.rsplit(".", 1)[-1]  # the defining module's name: "test_reward_core"
    assert Registered.family == family
    assert list_rewards(family) == ["test_brightness"]
    assert isinstance(create_reward("test_brightness", scale=3.0), Registered)

    @register_reward("test_factory")  # timm-style factory functions register too
    def factory(**kwargs):
        return Brightness(scale=5.0, **kwargs)

    assert create_reward("test_factory").config["scale"] == 5.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_brightness")(Brightness)
    with pytest.raises(TypeError, match="not a RewardModel"):
        register_reward("test_module")(nn.Linear)
    with pytest.raises(ValueError, match="reward name"):
        register_reward("a/b")


# -- Hub I/O ---------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    reward = Brightness(scale=2.0, hidden=3)
    reward.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == reward.config
    assert f"reward_class: {__name__}.Brightness" in (tmp_path / "ckpt" / "README.md").read_text()

    for loaded in (Brightness.from_pretrained(tmp_path / "ckpt"), create_reward(str(tmp_path / "ckpt"))):
        assert type(loaded) is Brightness and loaded.config == reward.config
        for key, value in reward.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
        v = videos()
        assert torch.equal(loaded(v)["overall"], reward(v)["overall"])
    # kwargs override the saved config (and must still match the weights)
    with pytest.raises(ValueError, match=r"key 'proj.weight' has shape \(1, 3\) in the checkpoint but \(1, 2\)"):
        create_reward(str(tmp_path / "ckpt"), hidden=2)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: {("proj.weights" if k == "proj.weight" else k): v for k, v in s.items()}, "missing key 'proj.weight'"),
    (lambda s: {**s, "extra.bias": torch.zeros(1)}, "unexpected key 'extra.bias'"),
    (lambda s: {**s, "proj.bias": torch.zeros(2)}, r"key 'proj.bias' has shape \(2,\)"),
])
def test_loading_is_strict(tmp_path, edit, match):
    Brightness().save_pretrained(tmp_path)
    weights = tmp_path / constants.SAFETENSORS_SINGLE_FILE
    save_file(edit(load_file(weights)), weights)
    with pytest.raises(ValueError, match=match):
        Brightness.from_pretrained(tmp_path)


def test_loading_is_safetensors_only(tmp_path):
    Brightness().save_pretrained(tmp_path)
    (tmp_path / constants.SAFETENSORS_SINGLE_FILE).rename(tmp_path / constants.PYTORCH_WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        create_reward(str(tmp_path))


def test_load_from_hub_id(tmp_path, monkeypatch):
    """``hf-hub:org/repo`` resolves through the Hub cache (pre-populated here; tests never go online)."""
    repo = tmp_path / "models--org--brightness"
    Brightness(scale=4.0).save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    reward = create_reward("hf-hub:org/brightness")
    assert type(reward) is Brightness and reward.config == {"scale": 4.0, "hidden": 2}


def test_checkpoint_of_unknown_class_is_refused(tmp_path):
    Brightness().save_pretrained(tmp_path)
    card = tmp_path / "README.md"
    card.write_text(card.read_text().replace(f"{__name__}.Brightness", "evil.module.Payload"))
    with pytest.raises(ValueError, match="unknown reward class 'evil.module.Payload'"):
        create_reward(str(tmp_path))


# -- CompositeReward -------------------------------------------------------------------------------------------
def test_composite_weighted_sum_and_dimensions():
    a, b = Brightness(scale=1.0), Brightness(scale=3.0)
    composite = CompositeReward({"a": a, "b": b}, {"a": 0.5, "b": 2.0})
    v = videos(b=3)
    out = composite(v)
    assert composite.dimensions == ("a/brightness", "a/overall", "b/brightness", "b/overall")
    assert set(out) == set(composite.dimensions) | {"overall"}
    mean = v.mean((1, 2, 3, 4))
    torch.testing.assert_close(out["b/overall"], 3 * mean)  # measured exact (torch 2.13.0 / 2.14.1)
    torch.testing.assert_close(out["overall"], 0.5 * mean + 2.0 * 3 * mean)  # measured exact (torch 2.13.0 / 2.14.1)
    assert composite.differentiable


def test_composite_normalisations():
    v = torch.stack([torch.full((4, 3, 8, 8), x) for x in (0.2, 0.4, 0.9)])
    a, b = Brightness(), Brightness(scale=-1.0)
    z = CompositeReward({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, normalize="zscore")(v)["overall"]
    mean = torch.tensor([0.2, 0.4, 0.9])
    expected = (mean - mean.mean()) / mean.std(unbiased=False)
    # zscore divides by std + 1e-6 (std 0.29 here), a relative offset of 3.4e-6: measured 3.9e-6 (torch 2.13.0 /
    # 2.14.1); rtol 1e-4 is 25x that
    torch.testing.assert_close(z, 0.5 * expected, rtol=1e-4, atol=0)
    rank = CompositeReward({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, normalize="rank")
    # measured exact (torch 2.13.0 / 2.14.1)
    torch.testing.assert_close(rank(v)["overall"], torch.tensor([0.5, 0.75, 1.0]))
    assert not rank.differentiable
    # measured exact (torch 2.13.0 / 2.14.1)
    torch.testing.assert_close(batch_rank(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([5, 0, 5, 2]) / 6)
    assert batch_rank(torch.tensor([7.0])).item() == 0.5
    assert zscore(torch.tensor([7.0])).item() == 0.0


class TwoHeads(RewardModel):
    """Brightness and darkness heads whose ``overall`` is brightness: for ``score_keys``."""

    dimensions = ("bright", "dark")

    def forward(self, videos: Tensor, prompts=None, references=None) -> dict[str, Tensor]:
        mean = videos.mean((1, 2, 3, 4))  # (b,)
        return {"bright": mean, "dark": 1 - mean, "overall": mean}


def test_composite_score_keys_pick_one_head():
    v = torch.stack([torch.full((4, 3, 8, 8), x) for x in (0.2, 0.4, 0.9)])
    heads = TwoHeads()
    dark = CompositeReward({"h": heads}, {"h": 2.0}, score_keys={"h": "dark"})
    torch.testing.assert_close(dark(v)["overall"], 2.0 * (1 - torch.tensor([0.2, 0.4, 0.9])))
    assert dark.config["score_keys"] == {"h": "dark"}
    default = CompositeReward({"h": heads}, {"h": 2.0})
    torch.testing.assert_close(default(v)["overall"], 2.0 * torch.tensor([0.2, 0.4, 0.9]))
    with pytest.raises(ValueError, match=r"score_keys\['h'\] is 'visual', but reward 'h' scores only"):
        CompositeReward({"h": heads}, {"h": 1.0}, score_keys={"h": "visual"})
    with pytest.raises(ValueError, match=r"score_keys names rewards \['x'\]"):
        CompositeReward({"h": heads}, {"h": 1.0}, score_keys={"x": "dark"})


def test_composite_validation():
    a = Brightness()
    with pytest.raises(ValueError, match=r"weights keys \['b'\] must equal rewards keys \['a'\]"):
        CompositeReward({"a": a}, {"b": 1.0})
    with pytest.raises(ValueError, match="normalize must be one of"):
        CompositeReward({"a": a}, {"a": 1.0}, normalize="minmax")
    with pytest.raises(ValueError, match="without '.' or '/'"):
        CompositeReward({"a/b": a}, {"a/b": 1.0})
    with pytest.raises(ValueError, match="finite numbers"):
        CompositeReward({"a": a}, {"a": math.nan})
    with pytest.raises(ValueError, match="at least one reward"):
        CompositeReward({}, {})
    needs = CompositeReward({"a": a, "n": NeedsEverything()}, {"a": 1.0, "n": 1.0})
    assert needs.requires_prompts and needs.requires_references
    with pytest.raises(ValueError, match="needs prompts"):
        needs(videos())


def test_composite_config_and_round_trip(tmp_path):
    composite = CompositeReward({"a": Brightness(scale=2.0), "f": create_reward("flicker")},
                                {"a": 1.0, "f": 0.5}, normalize="zscore")
    assert composite.config == {
        "rewards": {"a": {"class_path": f"{__name__}.Brightness", "init_args": {"scale": 2.0, "hidden": 2}},
                    "f": {"class_path": "reward_zoo.temporal.TemporalFlicker", "init_args": {"grid": 4}}},
        "weights": {"a": 1.0, "f": 0.5},
        "normalize": "zscore",
        "score_keys": None,
    }
    assert CompositeReward(**composite.config).config == composite.config  # the YAML init_args form builds it
    composite.save_pretrained(tmp_path)
    loaded = create_reward(str(tmp_path))
    v = videos(b=3)
    torch.testing.assert_close(loaded(v)["overall"], composite(v)["overall"])  # measured exact (torch 2.13.0 / 2.14.1)
    assert set(loaded.state_dict()) == {"rewards.a.proj.weight", "rewards.a.proj.bias"}


# -- losses ----------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_values():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # -log sigmoid(1), -log sigmoid(0)
    # float32 against float64: this test and the next measured rel err <= 6.1e-8 (~1 ulp; torch 2.13.0 / 2.14.1,
    # AVX-512 / AVX2 / baseline CPU kernels); rel 1e-6 is 16 ulp
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_bradley_terry_ties_loss_hand_values():
    zero = torch.zeros(1)
    # d = 0, k = 5: P(a wins) = sigmoid(-log 5) = 1/6, P(tie) = 1 - 2/6 = 2/3
    untied = bradley_terry_ties_loss(zero, zero, torch.tensor([False]), k=5.0)
    tied = bradley_terry_ties_loss(zero, zero, torch.tensor([True]), k=5.0)
    assert untied.item() == pytest.approx(math.log(6), rel=1e-6)
    assert tied.item() == pytest.approx(-math.log(2 / 3), rel=1e-6)
    # d = log 2, k = 2: P(a wins) = sigmoid(0) = 1/2, P(b wins) = sigmoid(-2 log 2) = 1/5, P(tie) = 3/10
    r_a, r_b = torch.tensor([math.log(2), math.log(2)]), torch.zeros(2)
    mixed = bradley_terry_ties_loss(r_a, r_b, torch.tensor([False, True]), k=2.0)
    assert mixed.item() == pytest.approx((math.log(2) - math.log(0.3)) / 2, rel=1e-6)


def test_bradley_terry_ties_probabilities_sum_to_one():
    d, k = torch.linspace(-4, 4, 9), 3.0
    win = torch.exp(-bradley_terry_ties_loss_per_pair(d, torch.zeros(9, dtype=torch.bool), k))
    tie = torch.exp(-bradley_terry_ties_loss_per_pair(d, torch.ones(9, dtype=torch.bool), k))
    lose = torch.exp(-bradley_terry_ties_loss_per_pair(-d, torch.zeros(9, dtype=torch.bool), k))
    # measured 1.2e-7 off (1 ulp); assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) are 10x and more above
    torch.testing.assert_close(win + tie + lose, torch.ones(9))


def bradley_terry_ties_loss_per_pair(d: Tensor, tie: Tensor, k: float) -> Tensor:
    return torch.stack([bradley_terry_ties_loss(d[i:i + 1], torch.zeros(1), tie[i:i + 1], k) for i in range(len(d))])


def test_bradley_terry_ties_loss_checks():
    with pytest.raises(ValueError, match="k must be greater than 1"):
        bradley_terry_ties_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool), k=1.0)
    with pytest.raises(ValueError, match="tie must be a bool tensor"):
        bradley_terry_ties_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2))


def test_package_exports():
    assert set(reward_zoo.__all__) >= {"RewardModel", "register_reward", "create_reward", "list_rewards",
                                       "get_reward_class", "reward_info",
                                       "CompositeReward", "bradley_terry_loss", "bradley_terry_ties_loss"}
