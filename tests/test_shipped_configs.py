"""Configs by name (lit_videoalign.shipped_configs) and short model class names (lit_videoalign.subcommands)."""

import sys
from pathlib import Path

import pytest

from lit_videoalign.cli import main
from lit_videoalign.errors import UsageError
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.shipped_configs import (
    SUITE_CONFIGS,
    config_path,
    describe_config,
    list_configs,
    resolve_config_args,
)
from lit_videoalign.subcommands import canonical_class_path, expand_model_names, import_packages

PACKAGE_CONFIGS = SUITE_CONFIGS[""]
REWARD_CONFIGS = {"rewards/": Path(__file__).resolve().parent.parent / "reward_zoo" / "configs"}


def test_every_shipped_file_has_a_name_and_the_name_finds_it():
    names = list_configs()
    files = sorted(PACKAGE_CONFIGS.rglob("*.yaml"))
    assert len(names) == len(files) and {"toyworld/sft", "toyworld/nft", "wan2.1-1.3b/sft_lora"} <= set(names)
    assert sorted(config_path(n) for n in names) == files
    assert list_configs(REWARD_CONFIGS) == ["rewards/identity", "rewards/physics_learned", "rewards/quality",
                                            "rewards/vlm_judge_unifiedreward", "rewards/vlm_judge_videoscore2"]


@pytest.mark.parametrize("name", ["toyworld/sft", "toyworld/sft.yaml", "builtin:toyworld/sft",
                                  "builtin:toyworld/sft.yaml", "configs/toyworld/sft.yaml"])
def test_a_name_may_carry_builtin_configs_and_yaml(name):
    assert config_path(name) == PACKAGE_CONFIGS / "toyworld" / "sft.yaml"


def test_an_unknown_name_is_named_with_the_closest_ones():
    with pytest.raises(UsageError, match=r"'toyworld/sfft'.*closest: toyworld/sft") as err:
        config_path("toyworld/sfft")
    assert "\n" not in str(err.value) and "videoalign configs" in str(err.value)
    with pytest.raises(UsageError, match=r"closest: rewards/quality.*reward-zoo configs"):
        config_path("rewards/qualty", REWARD_CONFIGS, "reward-zoo")


def test_a_real_file_wins_over_a_shipped_name_unless_builtin_is_said(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toyworld").mkdir()
    (tmp_path / "toyworld" / "sft.yaml").write_text("seed_everything: 1\n")
    shipped = str(PACKAGE_CONFIGS / "toyworld" / "sft.yaml")
    argv = ["fit", "--config", "toyworld/sft.yaml", "--config=toyworld/nft", "-c", "builtin:toyworld/sft",
            "--trainer.max_steps=2", "--config", "{trainer: {max_steps: 3}}"]
    assert resolve_config_args(argv) == ["fit", "--config", "toyworld/sft.yaml",
                                         f"--config={PACKAGE_CONFIGS / 'toyworld' / 'nft.yaml'}", "-c", shipped,
                                         "--trainer.max_steps=2", "--config", "{trainer: {max_steps: 3}}"]
    with pytest.raises(UsageError, match="'nowhere.yaml': no such file"):
        resolve_config_args(["fit", "--config", "nowhere.yaml"])


def test_every_shipped_config_names_its_method_and_backbone():
    for name in list_configs():
        method, source = describe_config(config_path(name))
        assert method != "?" and source != "?", name
    assert describe_config(config_path("toyworld/nft")) == ("DiffusionNFT", "builtin:toyworld-base")
    assert describe_config(config_path("rewards/quality", REWARD_CONFIGS)) == ("RewardTraining",
                                                                               "reward QualityReward")
    for name in list_configs(REWARD_CONFIGS):  # training configs and reward specs alike
        assert "?" not in describe_config(config_path(name, REWARD_CONFIGS)), name
    assert describe_config(config_path("rewards/vlm_judge_videoscore2", REWARD_CONFIGS)) == ("VLMJudge",
                                                                                           "TIGER-Lab/VideoScore2")


def test_configs_subcommand_lists_one_config_per_line(capsys):
    main(["configs"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_configs()
    assert lines[list_configs().index("toyworld/sft")].split() == ["toyworld/sft", "SFT", "builtin:toyworld-base"]
    with pytest.raises(UsageError, match="takes no arguments"):
        main(["configs", "toyworld"])


def test_fit_reads_a_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "toyworld/sft", "--model", "DPO", "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lit_videoalign.objectives.dpo.DPO" in printed and "builtin:toyworld-base" in printed
    from reward_zoo.cli import main as reward_main

    with pytest.raises(SystemExit):
        reward_main(["fit", "--config", "rewards/quality", "--print_config"])
    assert "reward_zoo.quality.QualityReward" in capsys.readouterr().out


def test_short_model_names_become_the_defining_class_path():
    import_packages(("lit_videoalign.objectives",))
    argv = ["fit", "--model", "SFT", "--model=DiffusionNFT", "--model.class_path", "DPO", "--model", "a.b.C",
            "--data", "SFT", "--model=null"]
    assert expand_model_names(argv, AlignmentModule) == [
        "fit", "--model", "lit_videoalign.objectives.sft.SFT", "--model=lit_videoalign.objectives.nft.DiffusionNFT",
        "--model.class_path", "lit_videoalign.objectives.dpo.DPO", "--model", "a.b.C", "--data", "SFT", "--model=null"]
    with pytest.raises(UsageError, match=r"--model SFTT: .*did you mean SFT\?.*known: .*DMD, DPO, DiffusionNFT"):
        expand_model_names(["generate", "--model=SFTT"], AlignmentModule)


def test_a_re_exported_class_path_is_the_same_class_and_foreign_modules_are_not_imported():
    assert canonical_class_path("lit_videoalign.SFT") == "lit_videoalign.objectives.sft.SFT"
    assert canonical_class_path("lit_videoalign.objectives.sft.SFT") == "lit_videoalign.objectives.sft.SFT"
    assert canonical_class_path("somewhere_else_entirely.Evil") == "somewhere_else_entirely.Evil"
    assert "somewhere_else_entirely" not in sys.modules
