"""Streaming generation (``generate --stream``): a causal student past its trained length, a growing MP4, the same
frames as ``generate``, exact chunk-wise VAE decoding, and one-line errors that write nothing."""

import json
from pathlib import Path

import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.cli import main
from lit_videoalign.objectives.self_forcing import SelfForcing
from lit_videoalign.streaming import decode_stream, stream_videos
from lit_videoalign.testing import tiny_wan_pipeline
from lit_videoalign.video_io import StreamingMP4Writer, probe_video, read_video

PROMPT = "a red ball falls"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_wan_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-pixel-wan", pixel_space=True)  # 16x32x32 clips


@pytest.fixture(scope="module")
def student(pipeline) -> SelfForcing:
    """A tiny causal student: 16 frames in 4 chunks of 4, 2 steps each, no KV window of its own."""
    return SelfForcing(DiffusersVideoBackbone(str(pipeline), max_sequence_length=16), chunk_frames=4,
                       num_inference_steps=2, num_frames=16, height=32, width=32)


def watch_writes(monkeypatch) -> list[tuple[StreamingMP4Writer, torch.Tensor, int, bool]]:
    """Record each ``StreamingMP4Writer.write``: the writer, its frames, the temporary file's size after the write, and
    whether the final file existed then."""
    seen, write = [], StreamingMP4Writer.write

    def watched(self, frames):
        write(self, frames)
        seen.append((self, frames.clone(), self.tmp.stat().st_size, self.path.exists()))

    monkeypatch.setattr(StreamingMP4Writer, "write", watched)
    return seen


def test_streams_four_times_the_trained_length_into_a_growing_mp4(student, tmp_path, monkeypatch):
    seen = watch_writes(monkeypatch)
    out = tmp_path / "gen"
    [file] = stream_videos(student, [PROMPT], [3], out, num_frames=64, window_chunks=3, sink_chunks=1)
    assert probe_video(file).num_frames == probe_video(file, decode=False).num_frames == 64
    assert len(seen) == 16 and probe_video(file).fps == student.backbone.fps  # 16 chunks of 4 frames
    sizes = [size for _, _, size, _ in seen]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))  # frames reach the disk chunk by chunk
    assert not any(final for *_, final in seen)  # under a temporary name until the end
    entries = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(e["file_name"], e["seed"]) for e in entries] == [(file.name, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted([file.name, "metadata.jsonl"])  # no temporary left


def test_a_partial_stream_is_playable(student, tmp_path, monkeypatch):
    """Halfway through, the temporary file already decodes to all frames so far but the newest."""
    seen, write = [], StreamingMP4Writer.write

    def watched(self, frames):
        write(self, frames)
        seen.append(probe_video(self.tmp).num_frames)

    monkeypatch.setattr(StreamingMP4Writer, "write", watched)
    stream_videos(student, [PROMPT], [0], tmp_path / "gen", num_frames=32, window_chunks=2)
    assert seen == [4 * (j + 1) - 1 for j in range(8)]


def test_trained_length_without_window_streams_the_frames_of_generate(student, tmp_path, monkeypatch):
    seen = watch_writes(monkeypatch)
    prompts, seeds = [PROMPT, "a blue ball moves left"], [5, 6]
    files = stream_videos(student, prompts, seeds, tmp_path / "gen", batch_size=2)
    expected = student.generate(prompts, seeds)  # (b, t, c, h, w)
    for file, video in zip(files, expected):
        streamed = torch.cat([frames for writer, frames, *_ in seen if writer.path == file])  # (t, c, h, w)
        torch.testing.assert_close(streamed, video, rtol=0, atol=1e-6)
        decoded = read_video(file)[:, :, ::4, ::4]  # written 4x upscaled for viewing
        assert decoded.shape == video.shape and (decoded - video).abs().mean() < 0.02  # H.264 near-lossless


def test_writer_commits_whole_or_not_at_all(tmp_path):
    video = torch.rand(8, 3, 16, 16)
    with StreamingMP4Writer(tmp_path / "a.mp4", fps=8) as writer:
        writer.write(video[:4])
        writer.write(video[4:])
    assert probe_video(tmp_path / "a.mp4").num_frames == 8
    with pytest.raises(ValueError, match="frames of 8x8 .* expected 16x16"):
        with StreamingMP4Writer(tmp_path / "b.mp4") as writer:
            writer.write(video[:4])
            writer.write(torch.rand(2, 3, 8, 8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


def test_vae_chunks_decode_exactly_as_the_whole_video(tmp_path):
    backbone = DiffusersVideoBackbone(str(tiny_wan_pipeline(tmp_path / "tiny-wan")), max_sequence_length=16)
    latents = torch.randn(2, *backbone.latent_shape(17, 32, 32))  # (b, c, 5, h', w'): 17 frames
    chunks = [latents[:, :, j:j + 1] for j in range(latents.shape[2])]
    frames = list(decode_stream(backbone, chunks))
    assert [f.shape[1] for f in frames] == [1, 4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(frames, dim=1), backbone.decode_latents(latents), rtol=0, atol=0)


def test_a_failed_stream_leaves_nothing_behind(student, tmp_path, monkeypatch):
    stream = SelfForcing.stream_latents

    def failing(self, *args, **kwargs):
        for j, chunk in enumerate(stream(self, *args, **kwargs)):
            if j == 2:
                raise RuntimeError("out of memory")
            yield chunk

    monkeypatch.setattr(SelfForcing, "stream_latents", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream_videos(student, [PROMPT], [0], tmp_path / "gen", num_frames=32)
    assert not list(tmp_path.iterdir())


def write_config(path: Path, pipeline: Path, causal: bool = True) -> Path:
    """A checkpoint-free config of the tiny causal student (or, not ``causal``, a bidirectional SFT model)."""
    model = ("lit_videoalign.objectives.self_forcing.SelfForcing", "\n    chunk_frames: 4\n    num_inference_steps: 2"
             ) if causal else ("lit_videoalign.objectives.sft.SFT", "")
    path.write_text(f"""seed_everything: 0
model:
  class_path: {model[0]}
  init_args:{model[1]}
    num_frames: 16
    height: 32
    width: 32
    backbone:
      class_path: lit_videoalign.backbones.diffusers.DiffusersVideoBackbone
      init_args: {{pretrained_model_name_or_path: {pipeline}, max_sequence_length: 16}}
""")
    return path


def test_generate_stream_on_the_command_line(pipeline, tmp_path):
    config = write_config(tmp_path / "self_forcing.yaml", pipeline)
    out = tmp_path / "gen"
    main(["generate", "--config", str(config), "--prompts", PROMPT, "--seeds", "2", "--stream",
          "--num_frames", "32", "--kv_window_chunks", "2", "--sink_chunks", "1", "--device", "cpu",
          "--output_dir", str(out)])
    [file] = out.glob("*.mp4")
    assert "seed2" in file.name and probe_video(file).num_frames == 32


@pytest.mark.parametrize(("causal", "args", "message"), [
    (False, [], "SFT is bidirectional"),
    (True, ["--kv_window_chunks", "0"], "kv_window_chunks=0: the KV window must hold at least one chunk"),
    (True, ["--kv_window_chunks", "2", "--sink_chunks", "2"], "sink_chunks=2 must be 0, or smaller than"),
    (True, ["--num_frames", "18"], "--num_frames 18: chunk_frames=4 does not divide the 18 latent frames"),
    (True, ["--guidance_scale", "3"], "--stream cannot be combined with --guidance_scale"),
])
def test_bad_stream_requests_exit_with_one_line_and_write_nothing(pipeline, tmp_path, capsys, causal, args, message):
    config = write_config(tmp_path / "model.yaml", pipeline, causal=causal)
    out = tmp_path / "deep" / "gen"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--config", str(config), "--prompts", PROMPT, "--stream", "true", *args,
              "--output_dir", str(out)], exit_on_error=True)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "deep").exists()


def test_stream_options_need_stream(pipeline, tmp_path):
    config = write_config(tmp_path / "self_forcing.yaml", pipeline)
    with pytest.raises(ValueError, match="--num_frames is only used with --stream"):
        main(["generate", "--config", str(config), "--prompts", PROMPT, "--num_frames", "32",
              "--output_dir", str(tmp_path / "gen")])
