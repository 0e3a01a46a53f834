"""Start an image-to-video model from a text-to-video one: a Wan pipeline whose transformer takes the image channels
of ``WanImageToVideoPipeline`` (a mask channel per frame a latent frame covers, then the image's latents) as extra
input channels, their patch-embedding weights zero, so the widened model predicts exactly what the text-to-video model
did until fine-tuning teaches it to use the image (the usual way an I2V model is initialised from a T2V one).

    python -m lit_videoalign.backbones.i2v_init builtin:toyworld-base outputs/toyworld-i2v-init

Only diffusers and transformers classes are loaded, weights are read and written as safetensors, and the destination
appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lit_videoalign.errors import UsageError


def widen_to_image_to_video(source: str, destination: str | os.PathLike) -> Path:
    """Write ``source`` (a Wan text-to-video pipeline folder, Hub id or ``builtin:NAME``) to ``destination`` as a
    ``WanImageToVideoPipeline`` without an image encoder: the transformer's ``in_channels`` grow by ``ft + z`` (with a
    VAE: its temporal compression and latent channels; in pixel space: 1 + the output channels), zero-initialised."""
    from diffusers import WanTransformer3DModel

    from lit_videoalign.backbones.loading import resolve_pretrained_path

    root, out = resolve_pretrained_path(source), Path(destination)
    if out.exists():
        raise UsageError(f"destination {out} exists; choose a new folder")
    index = json.loads((root / "model_index.json").read_text())
    if (index.get("transformer") or [None, None])[1] != "WanTransformer3DModel":
        raise UsageError(f"{source} is not a Wan pipeline (transformer {index.get('transformer')}); expected "
                         "WanTransformer3DModel")
    transformer = WanTransformer3DModel.from_pretrained(root, subfolder="transformer")
    config = dict(transformer.config)
    if config["in_channels"] != (config["out_channels"] or config["in_channels"]):
        raise UsageError(f"{source} already takes {config['in_channels']} input channels for {config['out_channels']} "
                         "output channels: it is image-to-video")
    if (index.get("vae") or [None])[0]:
        vae_config = json.loads((root / "vae" / "config.json").read_text())
        extra = vae_config.get("scale_factor_temporal", 4) + vae_config["z_dim"]
    else:
        extra = 1 + config["out_channels"]
    config["in_channels"] += extra
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    widened = WanTransformer3DModel.from_config(config)
    state = transformer.state_dict()
    weight = state["patch_embedding.weight"]  # (dim, in, kt, kh, kw)
    state["patch_embedding.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])],
                                                dim=1)
    widened.load_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in root.iterdir():
            if item.name not in ("transformer", "model_index.json", "README.md") and not item.name.startswith("."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        widened.save_pretrained(tmp / "transformer", safe_serialization=True)
        index["_class_name"] = "WanImageToVideoPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a Wan text-to-video pipeline folder, Hub id or builtin:NAME")
    parser.add_argument("destination", help="a new folder for the image-to-video pipeline")
    args = parser.parse_args(argv)
    out = widen_to_image_to_video(args.source, args.destination)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
