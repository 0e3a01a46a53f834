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
