"""Toy-world preference pairs: labels follow the corruption, ties are ties, splits are disjoint, bad arguments named."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lit_videoalign.data.toyworld import (
    COLOURS,
    PHYSICS_CORRUPTIONS,
    TEST_SEED_OFFSET,
    VISUAL_CORRUPTIONS,
    ToyWorld,
    observe,
    prompt_agreement,
)
from lit_videoalign.data.toyworld_pairs import (
    PAIR_CORRUPTIONS,
    PAIR_DIMENSIONS,
    ToyWorldPairs,
    ToyWorldPairsDataModule,
    apply_corruption,
    colour_change,
    labels_for,
    rendition,
    text_mismatch,
)

WORLD = ToyWorld()
ONE_BALL = ToyWorld(max_balls=1)
SEEDS = range(TEST_SEED_OFFSET + 50_000_000, TEST_SEED_OFFSET + 50_000_030)


def test_labels_follow_the_damaged_dimensions():
    assert labels_for(None, "blur") == {"visual": 1, "motion": 0, "physics": 0, "text": 0, "identity": 0}
    assert labels_for("teleport", None) == {"visual": 0, "motion": -1, "physics": -1, "text": 0, "identity": 0}
    assert labels_for(None, "size_change")["identity"] == 1  # a size change breaks identity as well as physics
    assert labels_for("colour_change", None) == {"visual": 0, "motion": 0, "physics": 0, "text": 0, "identity": -1}
    assert labels_for(None, "wrong_direction")["text"] == 1
    mixed = labels_for("noise", "gravity_zero")  # each video is worse in its own dimension
    assert mixed["visual"] == -1 and mixed["physics"] == 1 and mixed["motion"] == 1
    assert set(labels_for("flicker", "flicker").values()) == {0}
    with pytest.raises(ValueError, match="'melt'"):
        labels_for(None, "melt")


def test_items_are_deterministic_and_well_formed():
    ds = ToyWorldPairs(WORLD, size=40, seed=123)
    first, again = ds[5], ds[5]
    assert torch.equal(first["video_a"], again["video_a"]) and first["labels"] == again["labels"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["video_a"].shape == item["video_b"].shape == (16, 3, 32, 32)
        assert set(item["labels"]) == set(PAIR_DIMENSIONS)
        assert item["labels"] == labels_for(*(None if k == "clean" else k for k in (item["kind_a"], item["kind_b"])))
        assert item["tie"] == all(v == 0 for v in item["labels"].values())
        for video in (item["video_a"], item["video_b"]):
            assert video.min() >= 0 and video.max() <= 1


def test_pair_mix_covers_ties_mixed_pairs_and_both_orders():
    ds = ToyWorldPairs(WORLD, size=300, seed=0, tie_prob=0.2, mixed_prob=0.2)
    items = [ds[i] for i in range(len(ds))]
    kinds = Counter(("clean" in (it["kind_a"], it["kind_b"]), it["tie"]) for it in items)
    ties = sum(it["tie"] for it in items) / len(items)
    assert 0.12 < ties < 0.3
    assert kinds[(False, False)] > 30  # mixed pairs: two different corruptions
    a_better = sum(it["labels"][d] > 0 for it in items for d in PAIR_DIMENSIONS)
    b_better = sum(it["labels"][d] < 0 for it in items for d in PAIR_DIMENSIONS)
    assert 0.4 < a_better / (a_better + b_better) < 0.6  # random order
    assert {it["kind_a"] for it in items} | {it["kind_b"] for it in items} == {"clean", *PAIR_CORRUPTIONS}


def test_tied_clean_pairs_are_two_renditions_of_the_same_prompt():
    for seed in SEEDS:
        example = WORLD.example(seed)
        other = rendition(WORLD, example, torch.Generator().manual_seed(seed))
        assert other.prompt == example.prompt
        assert not torch.equal(other.video, example.video)


def test_corruption_restriction_and_physics_pairs():
    ds = ToyWorldPairs(WORLD, size=60, seed=7, corruptions=list(PHYSICS_CORRUPTIONS), tie_prob=0.0, mixed_prob=0.0)
    for i in range(len(ds)):
        item = ds[i]
        kind = item["kind_b"] if item["kind_a"] == "clean" else item["kind_a"]
        assert kind in PHYSICS_CORRUPTIONS
        sign = 1 if item["kind_a"] == "clean" else -1
        assert item["labels"]["physics"] == item["labels"]["motion"] == sign
        assert item["labels"]["visual"] == item["labels"]["text"] == 0


def test_colour_change_switches_colour_mid_clip_only():
    example = ONE_BALL.example(SEEDS[0])
    changed = colour_change(example, torch.Generator().manual_seed(0))
    cut = changed.meta["cut"]
    assert torch.equal(changed.video[:cut], example.video[:cut])
    assert observe(changed.video[cut:]).colour != observe(example.video).colour
    assert changed.prompt == example.prompt


def test_text_mismatch_shows_another_scene_than_the_prompt():
    colour_wrong = direction_wrong = 0
    for seed in SEEDS:
        example = ONE_BALL.example(seed)
        assert prompt_agreement(example.video, example.prompt)["colour"]
        g = torch.Generator().manual_seed(seed)
        wrong = text_mismatch(example, "wrong_colour", g)
        colour_wrong += not prompt_agreement(wrong.video, example.prompt)["colour"]
        wrong = text_mismatch(example, "wrong_direction", g)
        assert wrong.meta["shows"] != example.prompt and wrong.prompt == example.prompt
        direction_wrong += not prompt_agreement(wrong.video, example.prompt)["direction"]
    assert colour_wrong == len(SEEDS)
    assert direction_wrong >= 0.8 * len(SEEDS)  # a fast ball can reach a wall and turn round, as in the world itself


def test_apply_corruption_keeps_the_shared_prompt_and_damages_pixels():
    example = WORLD.example(SEEDS[1], require_bounce=True)
    for kind in PAIR_CORRUPTIONS:
        bad = apply_corruption(WORLD, example, kind, torch.Generator().manual_seed(1))
        assert bad.prompt == example.prompt, kind
        assert not torch.equal(bad.video, example.video), kind
        if kind in VISUAL_CORRUPTIONS:
            assert observe(bad.video).colour in COLOURS


def test_datamodule_splits_are_disjoint_and_batches_collate():
    dm = ToyWorldPairsDataModule(batch_size=4, train_size=1000, val_size=8, test_size=8, seed=3)
    train, val, test = (dm.dataset(s) for s in ("train", "val", "test"))
    ranges = sorted((d.seed, d.seed + d.size) for d in (train, val, test))
    assert all(ranges[i][1] <= ranges[i + 1][0] for i in range(2))
    batch = next(iter(dm.train_dataloader()))
    assert batch["video_a"].shape == (4, 16, 3, 32, 32) and len(batch["prompt"]) == 4
    assert set(batch["labels"]) == set(PAIR_DIMENSIONS) and batch["labels"]["visual"].dtype == torch.int64
    assert batch["tie"].dtype == torch.bool
    assert len(list(dm.val_dataloader())) == 2 and len(list(dm.test_dataloader())) == 2
    assert "disjoint" in dm.describe()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"corruptions": ["melt"]}, "melt"),
    ({"corruptions": []}, "non-empty"),
    ({"tie_prob": 0.7, "mixed_prob": 0.5}, "sum to at most 1"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyWorldPairsDataModule(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        ToyWorldPairs(WORLD, size=2, seed=0)[2]
