"""Identity rewards after the DINO subject-fidelity score of DreamBooth (arXiv 2208.12242): does the video keep the
subject of a reference image (or of its own first frame) in every frame?

DreamBooth measures subject fidelity as the cosine similarity of self-supervised ViT (DINO) embeddings of a
generated image and a reference image of the subject; identity-preserving video generation (subject- and
face-conditioned image-to-video) reports the same similarity per frame. ``identity`` computes it for every frame
and reports the mean and the worst frame, since one frame where the subject turns into something else is exactly
the failure a mean hides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward

DREAMBOOTH = "https://arxiv.org/abs/2208.12242"


@register_reward("identity")
class IdentityReward(RewardModel, paper_url=DREAMBOOTH):
    """Cosine similarity, in a frame encoder's embedding space, of every frame to a reference.

    The reference is ``references`` (images ``[B, C, H, W]``, or videos ``[B, T, C, H, W]`` whose frames'
    normalised embeddings are averaged), or, when none is given, each video's own first frame (which is then left
    out of the scores, since it matches itself). Scores, each in [-1, 1]:

    - ``mean``: the mean similarity over the scored frames;
    - ``worst``: the lowest one (the frame where identity breaks most);
    - ``overall``: ``(1 - worst_weight) * mean + worst_weight * worst``, so a single broken frame costs more than
      its share of the mean.

    The defaults are the shipped toy-world encoder (timm's tiny ``test_resnet``, trained on toy-world pairs to ignore
    motion and image damage and to notice colour and size changes). For real footage use a self-supervised ViT:
    ``create_reward("identity", encoder="vit_small_patch14_dinov2.lvd142m", pretrained_encoder=True,
    frame_size=None)`` (frames are resized to the encoder's input size; DINOv2 weights are Apache-2.0).

    Args:
        encoder: timm model name of the frame encoder (built with ``num_classes=0``: pooled features).
        pretrained_encoder: load the encoder's pretrained timm weights (downloads them once).
        encoder_kwargs: extra ``timm.create_model`` arguments.
        frame_size: ``[height, width]`` frames and references are resized to, or None for the encoder's input size.
        worst_weight: weight of ``worst`` in ``overall``, in [0, 1].
    """

    dimensions = ("mean", "worst")
    differentiable = True
    min_frames = 2
    license = "apache-2.0"
    score_ranges = {d: (-1.0, 1.0) for d in (*dimensions, "overall")}  # cosine similarities

    @property
    def expected_resolution(self) -> tuple[int, int]:
        """The ``frame_size`` frames are resized to (the card's ``expected_resolution``)."""
        return tuple(self.frame_size)

    def __init__(
        self,
        encoder: str = "test_resnet",
        pretrained_encoder: bool = False,
        encoder_kwargs: dict | None = None,
        frame_size: list[int] | None = (32, 32),
        worst_weight: float = 0.5,
    ) -> None:
        super().__init__()
        import timm

        if not 0 <= worst_weight <= 1:
            raise ValueError(f"worst_weight must be in [0, 1], got {worst_weight}")
        if frame_size is not None and (len(frame_size) != 2 or min(frame_size) < 1):
            raise ValueError(f"frame_size must be [height, width] or None, got {frame_size!r}")
        self.encoder = timm.create_model(encoder, pretrained=pretrained_encoder, num_classes=0,
                                         **(encoder_kwargs or {}))
        cfg = timm.data.resolve_model_data_config(self.encoder)
        self.frame_size = tuple(frame_size) if frame_size is not None else tuple(cfg["input_size"][1:])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.worst_weight = worst_weight

    def embed(self, frames: Tensor) -> Tensor:
        """Unit-norm embeddings ``(n, d)`` of frames ``(n, c, h, w)`` in [0, 1]."""
        if frames.shape[-2:] != self.frame_size:
            frames = F.interpolate(frames, size=self.frame_size, mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self.encoder((frames - self.mean) / self.std), dim=-1)

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t = videos.shape[:2]
        feats = self.embed(videos.flatten(0, 1)).reshape(b, t, -1)  # (b, t, d)
        if references is None:
            ref, feats = feats[:, 0], feats[:, 1:]  # the first frame is the reference; score the others
        elif references.ndim == 4:  # images (b, c, h, w)
            ref = self.embed(references)
        else:  # reference videos (b, t', c, h, w): the mean direction of their frames
            ref = F.normalize(self.embed(references.flatten(0, 1)).reshape(b, references.shape[1], -1).mean(1), dim=-1)
        similarity = (feats * ref[:, None]).sum(-1)  # (b, t) cosine per frame
        mean, worst = similarity.mean(1), similarity.min(1).values
        return {"mean": mean, "worst": worst, "overall": (1 - self.worst_weight) * mean + self.worst_weight * worst}
