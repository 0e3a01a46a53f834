"""The default toy-world composite: a frozen-frame copy of a video never beats the original."""

import torch

from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld
from reward_zoo.composite import default_toyworld_composite


def test_frozen_copy_never_beats_the_original():
    reward = default_toyworld_composite()
    world = ToyWorld()
    wins = 0
    for seed in range(20):
        ex = world.example(TEST_SEED_OFFSET + 50_000 + seed)
        frozen = ex.video[:1].expand_as(ex.video)
        with torch.no_grad():
            scores = reward(torch.stack([ex.video, frozen]), [ex.prompt, ex.prompt])
        wins += bool(scores["overall"][0] > scores["overall"][1])
    assert wins == 20
