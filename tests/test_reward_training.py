"""reward_zoo.training: accuracy maths on hand-made scores, losses per dimension, training moves weights and lowers
the loss, export writes a loadable Hub folder with a model card, and the shipped ``physics_learned`` ranks held-out
pairs."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld
from lit_videoalign.data.toyworld_pairs import ToyWorldPairsDataModule, apply_corruption
from reward_zoo import create_reward
from reward_zoo.physics import LearnedPhysicsReward
from reward_zoo.training import (
    ExportReward,
    RewardTraining,
    calibrate_tie_threshold,
    pairwise_accuracy,
    tie_accuracy,
)

SEEDS = range(TEST_SEED_OFFSET + 40_000_000, TEST_SEED_OFFSET + 40_000_040)  # held out from training and model cards


# -- accuracy maths --------------------------------------------------------------------------------------------------
R_A = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0])
R_B = torch.tensor([0.0, 1.0, 0.45, 2.05, 0.0])
LABELS = torch.tensor([1, 1, 0, 0, -1])  # d = [1, -1, 0.05, -0.05, 0]


def test_pairwise_accuracy_counts_strict_pairs_only():
    assert pairwise_accuracy(R_A, R_B, LABELS) == pytest.approx(1 / 3)  # right, wrong, score tie counts wrong
    assert math.isnan(pairwise_accuracy(R_A[2:4], R_B[2:4], LABELS[2:4]))


def test_tie_accuracy_at_a_threshold():
    assert tie_accuracy(R_A, R_B, LABELS, 0.0) == pytest.approx(1 / 5)  # only the first pair (d = 0 gives sign 0)
    assert tie_accuracy(R_A, R_B, LABELS, 0.1) == pytest.approx(3 / 5)  # + the two small-gap ties
    assert tie_accuracy(R_A, R_B, LABELS, 10.0) == pytest.approx(2 / 5)  # everything called a tie


def test_tie_calibration_picks_the_best_threshold():
    threshold, acc = calibrate_tie_threshold(R_A, R_B, LABELS)
    assert acc == pytest.approx(3 / 5)
    assert 0.05 < threshold < 1.0 and tie_accuracy(R_A, R_B, LABELS, threshold) == pytest.approx(acc)
    # all ties: calling everything a tie is perfect; no ties and clear gaps: never call a tie
    threshold, acc = calibrate_tie_threshold(torch.tensor([0.1, 0.3]), torch.zeros(2), torch.tensor([0, 0]))
    assert acc == 1.0 and threshold > 0.3
    threshold, acc = calibrate_tie_threshold(torch.tensor([0.1, -0.3]), torch.zeros(2), torch.tensor([1, -1]))
    assert acc == 1.0 and threshold == 0.0


def test_accuracy_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="labels must be"):
        pairwise_accuracy(R_A, R_B, torch.tensor([2, 1, 0, 0, -1]))
    with pytest.raises(ValueError, match="same length"):
        tie_accuracy(R_A, R_B[:3], LABELS, 0.1)


# -- losses and training ---------------------------------------------------------------------------------------------
def tiny_physics() -> LearnedPhysicsReward:
    torch.manual_seed(0)
    return LearnedPhysicsReward(channels=[4, 4, 4], width=16, temporal_layers=1, num_heads=2)


def test_pair_loss_matches_the_losses_per_label():
    module = RewardTraining(tiny_physics(), loss="bt_ties", tie_k=3.0, dimensions={"physics": "physics"},
                            score_scale=2.0)
    r_a, r_b, labels = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.1, 0.4, 0.1]), torch.tensor([1, -1, 0])
    d = 2.0 * torch.tensor([0.2, 0.6, 0.0])  # preferred minus other, scaled
    log_k = math.log(3.0)
    expected = torch.stack([-F.logsigmoid(d[0] - log_k), -F.logsigmoid(d[1] - log_k),
                            -2 * F.logsigmoid(-d[2] - log_k) - math.log(8.0)]).mean()
    # the same float32 maths in another order: measured exact in both (torch 2.13.0 / 2.14.1); rel 1e-5 is ~80 ulp
    assert module.pair_loss(r_a, r_b, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    module = RewardTraining(tiny_physics(), loss="bt", dimensions=["physics"])
    assert module.pair_loss(r_a, r_b, labels).item() == pytest.approx(-F.logsigmoid(torch.tensor([0.2, 0.6])).mean()
                                                                     .item(), rel=1e-5)
    assert module.pair_loss(r_a, r_b, torch.zeros(3, dtype=torch.long)) is None  # BT skips ties


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_lowers_the_loss_and_moves_the_weights():
    dm = ToyWorldPairsDataModule(batch_size=8, val_size=4, test_size=4, corruptions=["gravity_zero", "teleport"],
                                 tie_prob=0.0, mixed_prob=0.0)
    batch = next(iter(dm.train_dataloader()))
    module = RewardTraining(tiny_physics(), dimensions={"physics": "physics"})
    before = {k: v.clone() for k, v in module.reward.state_dict().items()}
    optimizer = torch.optim.AdamW(module.reward.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):  # overfit one batch
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(not torch.equal(before[k], v) for k, v in module.reward.state_dict().items())


def test_trainer_fit_exports_a_loadable_hub_folder_with_a_model_card(tmp_path):
    dm = ToyWorldPairsDataModule(batch_size=2, val_size=6, test_size=6)
    module = RewardTraining(tiny_physics(), dimensions={"physics": "physics"},
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = {k: v.clone() for k, v in module.reward.state_dict().items()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2, limit_val_batches=2,
                        num_sanity_val_steps=0, callbacks=[ExportReward(str(tmp_path / "physics_tiny"))])
    trainer.fit(module, dm)
    assert "val/acc/physics" in trainer.callback_metrics and "val/acc_ties/physics" in trainer.callback_metrics
    assert any(not torch.equal(before[k], v) for k, v in module.reward.state_dict().items())
    folder = tmp_path / "physics_tiny"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md", "metrics.json"}
    assert json.loads((folder / "config.json").read_text()) == module.reward.config
    card = (folder / "README.md").read_text()
    assert "reward_class: reward_zoo.physics.LearnedPhysicsReward" in card and "license: apache-2.0" in card
    assert "Held-out accuracy (test split)" in card and "| physics | physics |" in card
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test"]["pairs"] == 6 and "acc_ties" in metrics["test"]["dimensions"]["physics"]
    loaded = create_reward(str(folder))
    for key, value in module.reward.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not loaded.training


def test_test_split_uses_the_validation_tie_threshold():
    dm = ToyWorldPairsDataModule(batch_size=4, val_size=8, test_size=8)
    module = RewardTraining(tiny_physics(), dimensions={"physics": "physics"})
    val = module.evaluate(dm.val_dataloader(), "val")
    test = module.evaluate(dm.test_dataloader(), "test")
    assert test["dimensions"]["physics"]["tie_threshold"] == val["dimensions"]["physics"]["tie_threshold"]
    with pytest.warns(UserWarning, match="no validation tie threshold"):
        RewardTraining(tiny_physics(), dimensions={"physics": "physics"}).evaluate(dm.test_dataloader(), "test")


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="'visual'.*does not output"):
        RewardTraining(tiny_physics(), dimensions={"visual": "visual"})
    with pytest.raises(ValueError, match="loss must be one of"):
        RewardTraining(tiny_physics(), loss="hinge")
    with pytest.raises(ValueError, match="tie_k"):
        RewardTraining(tiny_physics(), tie_k=1.0)
    with pytest.raises(ValueError, match="pass dimensions"):
        RewardTraining(create_reward("identity"))
    module = RewardTraining(tiny_physics(), dimensions={"physics": "smell"})
    batch = {"video_a": torch.rand(1, 4, 3, 32, 32), "video_b": torch.rand(1, 4, 3, 32, 32),
             "labels": {"physics": torch.tensor([1])}}
    with pytest.raises(KeyError, match="'smell'"):
        module.training_step(batch, 0)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        RewardTraining(create_reward("newton"), dimensions={"overall": "physics"}).configure_optimizers()


# -- the shipped learned physics reward ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def physics_learned() -> LearnedPhysicsReward:
    return create_reward("physics_learned", pretrained=True)


@pytest.mark.parametrize(("kind", "rate"), [("gravity_wrong", 0.95), ("gravity_zero", 0.95), ("teleport", 0.9),
                                            ("size_change", 0.9), ("time_reversal", 0.8)])
def test_shipped_physics_learned_ranks_true_physics_above_violations(physics_learned, kind, rate):
    world = ToyWorld()
    clean, bad = [], []
    for seed in SEEDS:
        example = world.example(seed, require_bounce=kind == "time_reversal")
        clean.append(example.video)
        bad.append(apply_corruption(world, example, kind, torch.Generator().manual_seed(seed)).video)
    with torch.no_grad():
        wins = physics_learned(torch.stack(clean))["physics"] > physics_learned(torch.stack(bad))["physics"]
    assert wins.float().mean() >= rate, f"{kind}: clean ranked higher for only {wins.float().mean():.0%} of seeds"


def test_init_weights_loads_strictly_and_names_bad_sources(tmp_path):
    trained = tiny_physics()
    with torch.no_grad():
        trained.head[-1].bias.fill_(3.0)
    trained.save_pretrained(tmp_path / "start")
    module = RewardTraining(tiny_physics(), dimensions=["physics"], init_weights=str(tmp_path / "start"))
    assert module.reward.head[-1].bias.item() == 3.0
    with pytest.raises(FileNotFoundError, match="'nowhere'"):
        RewardTraining(tiny_physics(), dimensions=["physics"], init_weights="nowhere")
    with pytest.raises(ValueError, match="does not match LearnedPhysicsReward"):
        RewardTraining(LearnedPhysicsReward(), dimensions=["physics"], init_weights=str(tmp_path / "start"))
