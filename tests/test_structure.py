"""The package structure of issue #23: cheap imports, a standalone reward zoo, package-level exports, declared
backbone capabilities, and the deprecated ``lit_videoalign.precompute`` path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lit_videoalign
from lit_videoalign.backbones.base import VideoBackbone
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.sft import SFT


def loaded_modules(code: str) -> set[str]:
    """The modules ``code`` leaves in ``sys.modules``, run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_bare_import_of_the_suite_loads_no_heavy_dependency():
    mods = loaded_modules("import lit_videoalign")
    heavy = sorted(m for m in mods if m.split(".")[0] in ("torch", "lightning", "diffusers", "transformers", "peft"))
    assert not heavy, f"import lit_videoalign loaded {heavy[:5]}"
    loaded = sorted(m for m in mods if m.startswith("lit_videoalign."))
    assert loaded == ["lit_videoalign._exports"], f"import lit_videoalign imported {loaded}"


def test_reward_zoo_and_its_cli_load_no_training_suite_module():
    mods = loaded_modules("import reward_zoo, reward_zoo.cli\nimport reward_zoo.registry as r\nr._import_families()")
    suite = sorted(m for m in mods if m.startswith(("lit_videoalign.objectives", "lit_videoalign.data",
                                                    "lit_videoalign.cli", "lit_videoalign.testing")))
    assert not suite, f"the reward zoo imported {suite}"
    assert "reward_zoo.quality" in mods and "reward_zoo.physics" in mods  # the families did load


def test_zoo_toyworld_defaults_agree_with_the_toy_world():
    from lit_videoalign.data import toyworld, toyworld_pairs
    from lit_videoalign.testing import build_word_tokenizer
    from reward_zoo import toyworld as zoo
    from reward_zoo.physics import NewtonReward
    from reward_zoo.quality import QualityReward

    assert zoo.COLOURS == toyworld.COLOURS and zoo.VOCABULARY == toyworld.VOCABULARY
    assert zoo.PAIR_DIMENSIONS == toyworld_pairs.PAIR_DIMENSIONS
    assert zoo.GRAVITY == toyworld.ToyWorld().gravity / 32  # px / frame^2 at 32 px -> frame heights / frame^2
    newton = NewtonReward()
    assert torch.equal(newton.colours, torch.tensor(list(toyworld.COLOURS.values())))
    assert newton.gravity == zoo.GRAVITY
    words = "a red ball falls , and a purple ball moves left"
    ids = QualityReward(width=8, num_heads=2, temporal_layers=1).tokenizer(words)["input_ids"]
    assert ids == build_word_tokenizer(toyworld.VOCABULARY, model_max_length=48)(words)["input_ids"]
    assert ids.count(2) == 1  # "purple" is unknown (<unk> is id 2)


@pytest.mark.parametrize(("package", "name", "module"), [
    ("lit_videoalign", "SFT", "lit_videoalign.objectives.sft"),
    ("lit_videoalign", "GRPO", "lit_videoalign.objectives.grpo"),
    ("lit_videoalign", "DiffusersVideoBackbone", "lit_videoalign.backbones.diffusers"),
    ("lit_videoalign.backbones", "Conditioning", "lit_videoalign.backbones.base"),
    ("lit_videoalign.callbacks", "RewardHackingMonitor", "lit_videoalign.callbacks.reward_hacking_monitor"),
    ("lit_videoalign.data", "ToyWorldDataModule", "lit_videoalign.data.toyworld"),
    ("lit_videoalign.objectives", "flow_dpo_loss", "lit_videoalign.objectives.dpo"),
    ("lit_videoalign.schedules", "sde_step_with_logprob", "lit_videoalign.schedules.flow"),
])
def test_package_exports_are_the_objects_of_their_modules(package, name, module):
    import importlib

    pkg = importlib.import_module(package)
    assert name in pkg.__all__ and name in dir(pkg)
    assert getattr(pkg, name) is getattr(importlib.import_module(module), name)


def test_every_export_resolves_and_unknown_names_raise():
    import importlib

    for package in ("lit_videoalign", "lit_videoalign.objectives", "lit_videoalign.backbones", "lit_videoalign.data",
                    "lit_videoalign.callbacks", "lit_videoalign.schedules", "lit_videoalign.inference"):
        pkg = importlib.import_module(package)
        for name in pkg.__all__:
            assert not isinstance(getattr(pkg, name), type(sys)), f"{package}.{name} is a module"
    with pytest.raises(AttributeError, match="has no attribute 'Sft'"):
        lit_videoalign.Sft  # noqa: B018


def test_deprecated_precompute_path_still_works_and_warns_once():
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    import lit_videoalign.precompute as old\n"
            "    import lit_videoalign.precompute  # a second import does not warn again\n"
            "from lit_videoalign.data.precompute import precompute\n"
            "from lit_videoalign.data.encoder_fingerprint import check_backbone\n"
            "assert old.precompute is precompute and old.check_backbone is check_backbone\n"
            "print([str(w.category.__name__) + ': ' + str(w.message) for w in seen])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = [w for w in eval(out.stdout.strip()) if "lit_videoalign.precompute" in w]
    assert len(seen) == 1 and seen[0].startswith("DeprecationWarning") and "lit_videoalign.data.precompute" in seen[0]


def test_backbone_capabilities_are_declared_class_attributes():
    for name in ("pixel_space", "is_quantized", "compile_blocks", "supports_images", "supports_context_parallel",
                 "supports_causal"):
        assert getattr(VideoBackbone, name) is False, name


def test_declared_quantized_capability_is_what_configure_model_reads(tiny_pixel_pipeline):
    class QuantizedBackbone(DiffusersVideoBackbone):
        is_quantized = True  # declared, as a backbone with 4-bit base weights would

    bb = QuantizedBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    with pytest.raises(ValueError, match="only a LoRA adapter can be trained"):
        SFT(bb).configure_model()
    SFT(QuantizedBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=2).configure_model()


def test_a_held_reward_stays_frozen_in_eval_and_scores_validation(tiny_pixel_pipeline):
    from reward_zoo.quality import QualityReward

    model = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), num_inference_steps=2)
    assert model.reward is None
    model.validate_with_reward({"prompt": ["a red ball falls"]}, 0)  # no reward: nothing to do
    reward = QualityReward(width=8, num_heads=2, temporal_layers=1).train()
    model.hold_reward(reward)
    model.train()
    assert model.training and model.backbone.denoiser.training
    assert not any(m.training for m in reward.modules()) and not any(p.requires_grad for p in reward.parameters())
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer and not in_optimizer & {id(p) for p in reward.parameters()}

    logged = {}
    model.log = lambda name, value, **kwargs: logged.update({name: (float(value), kwargs.get("prog_bar"))})
    prompts = ["a red ball falls", "a blue ball moves left"]
    model.validate_with_reward({"prompt": prompts}, 1)
    with torch.no_grad():
        expected = reward(model.generate(prompts, [1000, 1001]), prompts)
    assert set(logged) == {f"val/reward/{d}" for d in expected}
    for dim, values in expected.items():
        # the same seeds give the same videos: measured difference 0.0; the tolerance only absorbs float printing
        assert logged[f"val/reward/{dim}"] == (pytest.approx(values.mean().item(), abs=1e-6), dim == "overall")
