"""Win-rate advantages (Pref-GRPO) in GRPO and DiffusionNFT: win rates by hand, monotone in a pointwise reward,
seeded opponent subsets, a pairwise judge asked through ``compare``, equal groups, masking, and short fits."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.grpo import GRPO, group_advantages
from lit_videoalign.objectives.nft import DiffusionNFT, optimality_probability
from lit_videoalign.objectives.rollout_scoring import generate_and_score
from lit_videoalign.testing import Brightness
from reward_zoo.base import RewardModel
from reward_zoo.pairwise import PairwiseReward


class TablePairwise(RewardModel, PairwiseReward):
    """A judge that reads each video's id from its pixels (id / 20) and answers P(a beats b) from a fixed table; its
    pointwise side must never be called by win-rate scoring."""

    dimensions = ("table",)
    pairwise_dimensions = ("table",)

    def __init__(self, table: list[list[float]] | None = None) -> None:
        super().__init__()
        self.table = torch.tensor(table) if table is not None else None
        self.pair_batches: list[torch.Tensor] = []
        self.pointwise_calls = 0

    def forward(self, videos, prompts=None, references=None):
        self.pointwise_calls += 1
        b = videos.mean((1, 2, 3, 4))
        return {"table": b, "overall": b}

    def forward_pair(self, videos_a, videos_b, prompts, fps):
        ids_a, ids_b = ids(videos_a), ids(videos_b)
        self.pair_batches.append(torch.stack([ids_a, ids_b], 1))
        if self.table is None:  # brighter wins, as Bradley-Terry with a steep temperature would say
            p = (ids_a > ids_b).float() + 0.5 * (ids_a == ids_b).float()
        else:
            p = self.table[ids_a, ids_b]
        return {"table": p, "overall": p}


class PairwiseOnly(nn.Module, PairwiseReward):
    """A judge with no pointwise side at all; it prefers the brighter video."""

    pairwise_dimensions = ()

    def forward_pair(self, videos_a, videos_b, prompts, fps):
        return {"overall": torch.sigmoid(100 * (videos_a.mean((1, 2, 3, 4)) - videos_b.mean((1, 2, 3, 4))))}


class Offline(TablePairwise):
    def forward_pair(self, videos_a, videos_b, prompts, fps):
        raise ConnectionError("judge offline")


class NaNForOddItems(Brightness):
    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4)).clone()
        b[1::2] = float("nan")
        return {"brightness": b, "overall": b}


def ids(videos: torch.Tensor) -> torch.Tensor:
    return (videos.mean((1, 2, 3, 4)) * 20).round().long()


def videos_with_ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 2, 3, 4, 4).contiguous() / 20


class FakeObjective:
    """What :func:`generate_and_score` needs of an objective, without a backbone: the held reward and ``score``."""

    def __init__(self, reward, step: int = 0, **hp) -> None:
        self.reward, self.global_step, self.reward_failures = reward, step, 0
        self.backbone = SimpleNamespace(fps=8.0)
        self.hparams = SimpleNamespace(**{**dict(group_size=4, rollout_chunk_size=None, async_scoring=False,
                                                 advantage="win_rate", win_rate_pairs=None), **hp})

    def score(self, videos, prompts, references=None):
        return AlignmentModule.reward_scores(self, videos, prompts, "test", "skipped")

    def run(self, videos: torch.Tensor):
        prompts = ["a red ball falls"] * len(videos)
        return generate_and_score(self, prompts, lambda sl: (None, videos[sl]), "overall")[1]


def test_bradley_terry_win_rates_are_monotone_in_the_reward_within_each_group():
    videos = torch.rand(8, 2, 3, 4, 4)
    scored = FakeObjective(Brightness()).run(videos)
    reward = videos.mean((1, 2, 3, 4))
    assert torch.equal(scored.rewards["overall"], reward)  # the raw reward is still what is logged
    assert scored.valid.all() and scored.stats["win_rate_comparisons"] == 2 * 6  # every pair of two groups of 4
    for g in range(2):
        r, w = reward[4 * g:4 * g + 4], scored.signal[4 * g:4 * g + 4]
        assert torch.equal(r.argsort(), w.argsort())
        assert all((r[i] > r[j]) == (w[i] > w[j]) for i in range(4) for j in range(4) if i != j)


def test_win_rates_by_hand_from_a_known_probability_matrix_through_compare():
    # P(row beats column) for videos 0, 1, 2 (only the upper triangle is asked)
    judge = TablePairwise([[0.5, 0.8, 0.6], [0.2, 0.5, 0.3], [0.4, 0.7, 0.5]])
    scored = FakeObjective(judge, group_size=3).run(videos_with_ids([0, 1, 2]))
    # w0 = (0.8 + 0.6) / 2; w1 = ((1 - 0.8) + 0.3) / 2; w2 = ((1 - 0.6) + (1 - 0.3)) / 2
    assert torch.allclose(scored.signal, torch.tensor([0.7, 0.25, 0.55]))
    assert judge.pointwise_calls == 0 and len(judge.pair_batches) == 1  # one batched compare, never pointwise
    assert sorted(map(tuple, judge.pair_batches[0].tolist())) == [(0, 1), (0, 2), (1, 2)]
    assert torch.allclose(scored.rewards["table"], scored.signal)  # a pairwise judge logs its win rates


def test_k_random_opponents_make_k_times_group_size_comparisons_reproducibly(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]

    def drawn(step):
        judge = TablePairwise()
        scored = FakeObjective(judge, step=step, win_rate_pairs=2).run(videos_with_ids(values))
        pairs = torch.cat(judge.pair_batches)
        assert len(pairs) == scored.stats["win_rate_comparisons"] == 2 * 12  # K * group_size per group, 3 groups
        assert ((pairs[:, 0] // 4) == (pairs[:, 1] // 4)).all() and (pairs[:, 0] != pairs[:, 1]).all()
        assert torch.equal(torch.bincount(pairs[:, 0], minlength=12), torch.full((12,), 2))  # K opponents each
        return pairs

    assert torch.equal(drawn(3), drawn(3))  # the run's seed and the step fix the draw
    assert not torch.equal(drawn(3), drawn(4))  # another step, another draw (a tie has chance 3^-12)
    first = drawn(3)
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    assert not torch.equal(first, drawn(3))  # another run seed, another draw


def test_a_group_of_equal_rewards_gives_zero_advantages_and_r_one_half():
    videos = torch.full((8, 2, 3, 4, 4), 0.4)
    for judge in (Brightness(), TablePairwise()):
        scored = FakeObjective(judge).run(videos)
        assert scored.valid.all() and torch.equal(scored.signal, torch.full((8,), 0.5))
        adv = group_advantages(scored.signal, 4, valid=scored.valid)
        r, nft_adv = optimality_probability(scored.signal, 4, valid=scored.valid)
        assert torch.equal(adv, torch.zeros(8)) and torch.equal(r, torch.full((8,), 0.5))
        assert torch.equal(nft_adv, torch.zeros(8))


def test_nan_rewards_and_a_raising_judge_mask_their_samples():
    videos = torch.rand(4, 2, 3, 4, 4)
    scored = FakeObjective(NaNForOddItems()).run(videos)
    assert scored.valid.tolist() == [True, False, True, False]
    reward = videos.mean((1, 2, 3, 4))
    assert torch.allclose(scored.signal[[0, 2]], torch.sigmoid(torch.stack([reward[0] - reward[2],
                                                                            reward[2] - reward[0]])))
    objective = FakeObjective(Offline())
    with pytest.warns(UserWarning, match="judge offline"):
        scored = objective.run(videos)
    assert not scored.valid.any() and objective.reward_failures == 1


# -- the objectives ---------------------------------------------------------------------------------------------------
def backbone(pipeline):
    return DiffusersVideoBackbone(pipeline, max_sequence_length=16)


def trainer(steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def prompt_loader(batch_size=2):
    prompts = [{"prompt": p} for p in ["a red ball falls", "a blue ball moves left"] * 2]
    return torch.utils.data.DataLoader(prompts, batch_size=batch_size)


TINY = dict(lora_rank=4, group_size=4, num_sampling_steps=3, num_inference_steps=3,
            optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))


def test_bad_win_rate_options_are_named(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="advantage must be one of"):
        GRPO(backbone(tiny_pixel_pipeline), reward=Brightness(), advantage="rank", **TINY)
    with pytest.raises(ValueError, match=r"win_rate_pairs must be in \[1, group_size - 1\] = \[1, 3\]"):
        DiffusionNFT(backbone(tiny_pixel_pipeline), reward=Brightness(), advantage="win_rate", win_rate_pairs=4, **TINY)
    with pytest.raises(TypeError, match="RewardModel, got PairwiseOnly"):  # a pairwise judge needs win rates
        GRPO(backbone(tiny_pixel_pipeline), reward=PairwiseOnly(), **TINY)
    with pytest.raises(ValueError, match=r"reward_key 'brightness' is not a score of PairwiseOnly; expected one of "
                                         r"\['overall'\]"):  # a pairwise judge trains on what it compares
        DiffusionNFT(backbone(tiny_pixel_pipeline), reward=PairwiseOnly(), advantage="win_rate",
                     reward_key="brightness", **TINY)


@pytest.mark.parametrize("objective, reward, extra", [
    (GRPO, PairwiseOnly, dict(win_rate_pairs=2)),  # a judge with no pointwise side, K = 2 opponents
    (DiffusionNFT, Brightness, dict()),  # a pointwise reward through Bradley-Terry, every pair
])
def test_a_short_fit_with_win_rate_advantages_trains(tiny_pixel_pipeline, objective, reward, extra):
    model = objective(backbone(tiny_pixel_pipeline), reward=reward(), advantage="win_rate", **extra, **TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t = trainer(2)
    t.fit(model, train_dataloaders=prompt_loader())
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())
    expected = 2 * 8 if extra else 2 * 6  # two groups of 4: K * 4 or all 6 pairs each
    assert t.callback_metrics["train/win_rate_comparisons"] == expected
    assert t.callback_metrics["train/win_rate_seconds"] > 0 and t.callback_metrics["train/masked_samples"] == 0
    assert t.callback_metrics["train/reward_failures"] == 0
    assert torch.isfinite(t.callback_metrics["train/reward/overall"])


def test_a_served_pointwise_reward_is_scored_once_per_video_not_once_per_pair():
    from reward_zoo import create_reward
    from reward_zoo.server import start_server

    videos = torch.rand(8, 2, 3, 4, 4)
    with start_server(Brightness()) as server:
        remote = create_reward("remote", url=server.url, video_dtype="float32")
        scored = FakeObjective(remote).run(videos)
        assert server.reward_calls == 1  # one /score of the 8 videos, no /compare of 12 pairs
    local = FakeObjective(Brightness()).run(videos)
    assert scored.valid.all() and torch.allclose(scored.signal, local.signal)
