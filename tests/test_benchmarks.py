"""The benchmark entry point runs end to end at its tiniest size (figures are not checked: timings belong in
benchmarks/, never in assertions)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.__main__ import main
from benchmarks.toyworld_inference import parse_finetuned


def test_quick_overhead_writes_results(tmp_path):
    code = main(["--quick", "--only", "overhead", "--in_process", "--results", str(tmp_path), "--",
                 "--objectives", "sft", "dpo"])
    assert code == 0
    for name in ("overhead.json", "overhead.md", "index.json", "index.md"):
        assert (tmp_path / name).is_file(), name
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert set(result["objectives"]) == {"sft", "dpo"}
    for row in result["objectives"].values():
        for key in ("lightning_step_s", "hand_step_s", "ratio"):
            assert math.isfinite(row[key]["median"]) and row[key]["median"] > 0
    assert "| sft |" in (tmp_path / "overhead.md").read_text()
    assert json.loads((tmp_path / "index.json").read_text())["runs"][0]["status"] == "ok"


def test_finetuned_spec_takes_its_own_guidance():
    assert parse_finetuned("rsft=out/pipeline@1", 2.0) == ("rsft", "out/pipeline", 1.0)
    assert parse_finetuned("rsft=out/pipeline", 2.0) == ("rsft", "out/pipeline", 2.0)
    for bad in ("rsft", "=out/pipeline", "rsft=out/pipeline@strong"):
        with pytest.raises(ValueError, match="NAME=PIPELINE"):
            parse_finetuned(bad, 2.0)


def rl_record(method: str, seed: int, shifts: list[float], minutes: list[float]) -> dict:
    """A toyworld_rl run record: 4 prompts, every score shifted by ``shift`` at each point."""
    points = []
    for shift, cpu in zip(shifts, minutes):
        row = {"cpu_minutes": cpu, "step": int(cpu * 10), "diversity": 0.2 * (1 - 0.05 * shift)}
        for key in ("physics_learned", "quality", "newton", "trajectory_error"):
            row[f"{key}_per_video"] = [shift + 0.1 * i for i in range(4)]
            row[key] = shift + 0.15
        points.append(row)
    return {"method": method, "seed": seed, "points": points, "sampler": {"steps": 20, "guidance": 1.0}}


def test_toyworld_rl_pairs_every_point_with_the_base_and_checks_the_targets(tmp_path):
    from benchmarks.toyworld_rl import markdown, summarise, targets

    records = [rl_record("base", 0, [0.0], [0.0]), rl_record("grpo", 0, [0.0, 0.5], [0.0, 24.0]),
               rl_record("nft", 0, [0.0, 1.0, 2.0], [0.0, 2.0, 9.5]), rl_record("nft", 1, [0.0, 0.2], [0.0, 9.0])]
    summary = summarise(records)
    nft = [r for r in summary["runs"] if r["method"] == "nft" and r["seed"] == 0][0]
    assert [p["physics_learned"] for p in nft["points"]] == pytest.approx([0.0, 1.0, 2.0])  # paired: a pure shift
    assert all(p["physics_learned_ci95"] == pytest.approx(0.0) for p in nft["points"])
    assert nft["points"][2]["diversity_change_pct"] == pytest.approx(-10.0)
    said = targets(summary)
    assert "NFT seeds at 2.0, never CPU-min: not met" in said[0]  # seed 1 never reaches GRPO's +0.5
    assert any("nft seed 0" in t and "physics_learned +2.00" in t and ": met" in t for t in said)
    assert any("nft seed 1" in t and "not met" in t for t in said)
    table = markdown({"command": "x", "num_prompts": 4, "diversity_prompts": 1, "diversity_seeds": 2,
                      "summary": summary, "targets": said})
    assert "| nft | 0 | 20, 1 | 9.5 | 95 | +2.000 (+2.000 to +2.000)" in table
