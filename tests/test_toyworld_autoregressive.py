"""The autoregressive benchmark runs end to end on a causal student (quick mode: 2 prompts, 1x and 2x the trained
length) and writes its table, JSON and error-over-length plot; the teacher is timed all at once, the student per
chunk."""

import json

from benchmarks.toyworld_autoregressive import main


def test_quick_run_writes_the_table_the_curve_and_timings(tmp_path):
    out = tmp_path / "ar"
    main(["--quick", "--student", "sf=configs/toyworld/self_forcing.yaml", "--output", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert set(rows) == {"teacher", "sf"} and result["lengths"] == ["1x", "2x"]
    for row in rows.values():
        assert row["1x"]["trajectory_error_per_video"].__len__() == 2 and row["timing"]["fps"] > 0
        assert row["throughput"]["videos"] == 2 and row["throughput"]["fps"] > 0
    assert len(result["curves"]["teacher"]) == 32  # one value per frame of the 2x videos
    first_frame = rows["sf"]["timing"]["time_to_first_frame_s"]
    assert first_frame < rows["sf"]["timing"]["seconds_per_video"]  # the stream's first chunk comes before the end
    assert rows["teacher"]["timing"]["time_to_first_frame_s"] == rows["teacher"]["timing"]["seconds_per_video"]
    assert out.with_suffix(".png").stat().st_size > 0 and "| sf |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".gif").stat().st_size > 0 and result["gif_rows"] == ["teacher", "sf"]
