"""Physics rewards, after NewtonRewards (arXiv 2512.00425): verifiable Newtonian checks on tracked objects.

NewtonRewards extracts measurable proxies from a generated video (motion as velocity, appearance as mass) and
rewards constant-acceleration dynamics and mass conservation. ``newton`` does this differentiably for scenes of a
few uniformly coloured objects on a flat background, such as the toy world: soft per-colour masks give each
object's area (the mass proxy) and centroid; second differences of the centroids give accelerations, which must
equal gravity between contacts; energy must never grow (bounces only lose it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reward_zoo import toyworld
from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward

TOY_GRAVITY = toyworld.GRAVITY  # the toy world's gravity in frame heights per frame^2
OCCLUSION_AREA_DEVIATION = 0.05  # relative area deviation at which a frame's mask counts as partly hidden
MIN_CONTRAST = 0.05  # a tracked colour must differ from the background by at least this much (RGB distance)


@register_reward("newton")
class NewtonReward(RewardModel, paper_url="https://arxiv.org/abs/2512.00425"):
    """Verifiable Newtonian-motion reward for objects of known colours on a flat background.

    Each colour in ``colours`` is one track. A pixel's offset from the background, ``d = p - background``, is
    explained as coverage ``alpha * (colour - background)``: ``alpha`` (the projection of ``d`` on the colour
    direction) is the soft mask, and each pixel is softly assigned to the colour whose direction it matches best.
    Per track and frame this gives an area and a centroid (in frame heights), from which, per video:

    - ``acceleration``: the robust (median) second difference of the centroid must equal ``(0, gravity)``;
    - ``continuity``: the mean deviation of per-frame accelerations from that fit (teleports, jitter; bounces
      cost a little too, equally for every video of the scene);
    - ``mass``: the area stays constant (mean relative deviation from its median, bounded so a briefly
      occluded object costs little);
    - ``energy``: kinetic minus gravitational potential energy, per frame interval, never increases between
      intervals free of contacts and occlusion (bounces lose energy; a time-reversed bounce gains it);

    each scored ``exp(-error / tolerance)`` in (0, 1]; ``overall`` is their geometric mean. Tracks are weighted by
    presence, so colours absent from a video do not count; a video with no object scores 1.

    Defaults fit the toy world (its palette and gravity, background estimated as the per-channel median). For
    other footage pass its object colours (or None for one track of all foreground) and ``gravity=None``, which
    only requires a consistent downward acceleration.

    How often it ranks clean toy-world videos above each physics corruption, per dimension, on held-out seeds:
    ``benchmarks/results/reward_zoo.md`` (``python -m benchmarks.reward_zoo``).

    Args:
        gravity: expected acceleration in frame heights per frame^2 (positive is down), or None if unknown.
        colours: RGB in [0, 1] of the objects to track, or None to track all foreground as one object.
        background: RGB in [0, 1] of the background, or None to estimate it per video (median over all pixels).
        colour_temperature: softness of the colour assignment, in units of the angle's sine.
        min_area: mean area (in frame heights^2; times the colour contrast when ``colours`` is None) at which a
            track counts as present.
        acceleration_tolerance: acceleration error (frame heights / frame^2) that scores exp(-1).
        continuity_tolerance: mean acceleration deviation (frame heights / frame^2) that scores exp(-1).
        mass_tolerance: mean relative area deviation ``|a - median| / (a + median)`` that scores exp(-1).
        energy_tolerance: energy gain ((frame heights / frame)^2) that scores exp(-1).
        contact_threshold: acceleration deviation (frame heights / frame^2) above which a frame is treated as a
            contact and left out of the energy check.
        energy_margin: energy gain ((frame heights / frame)^2) tolerated as measurement noise (about 0.1 px^2 at
            32 px) before it counts.
    """

    dimensions = ("acceleration", "continuity", "mass", "energy")
    differentiable = True
    min_frames = 4
    license = "apache-2.0"
    score_ranges = {d: (0.0, 1.0) for d in (*dimensions, "overall")}
    expected_fps = 8.0  # the default gravity is the toy world's, per frame^2 at its 8 fps

    def __init__(
        self,
        gravity: float | None = TOY_GRAVITY,
        colours: list[list[float]] | None = tuple(toyworld.COLOURS.values()),
        background: list[float] | None = None,
        colour_temperature: float = 0.1,
        min_area: float = 0.002,
        acceleration_tolerance: float = 0.003,
        continuity_tolerance: float = 0.03,
        mass_tolerance: float = 0.1,
        energy_tolerance: float = 0.0005,
        contact_threshold: float = 0.01,
        energy_margin: float = 0.0001,
    ) -> None:
        super().__init__()
        for name, value in [("colour_temperature", colour_temperature), ("min_area", min_area),
                            ("acceleration_tolerance", acceleration_tolerance),
                            ("continuity_tolerance", continuity_tolerance), ("mass_tolerance", mass_tolerance),
                            ("energy_tolerance", energy_tolerance), ("contact_threshold", contact_threshold)]:
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not energy_margin >= 0:
            raise ValueError(f"energy_margin must be non-negative, got {energy_margin}")
        self.gravity = gravity
        self.colour_temperature, self.min_area = colour_temperature, min_area
        self.tolerances = {"acceleration": acceleration_tolerance, "continuity": continuity_tolerance,
                           "mass": mass_tolerance, "energy": energy_tolerance}
        self.contact_threshold, self.energy_margin = contact_threshold, energy_margin
        self.register_buffer("colours", None if colours is None else _rgb_tensor(colours, "colours", rows=True),
                             persistent=False)
        self.register_buffer("background", None if background is None else _rgb_tensor(background, "background",
                                                                                         rows=False), persistent=False)

    def masks(self, videos: Tensor) -> Tensor:
        """Soft per-track coverage masks ``(b, t, k, h, w)``, roughly the fraction of each pixel an object covers."""
        b, t, c, h, w = videos.shape
        if self.background is None:
            background = videos.permute(0, 2, 1, 3, 4).reshape(b, c, -1).median(dim=-1).values  # (b, c)
        else:
            background = self.background.to(videos).expand(b, c)
        d = videos - background.view(b, 1, c, 1, 1)  # (b, t, c, h, w)
        if self.colours is None:
            return d.norm(dim=2, keepdim=True)  # (b, t, 1, h, w): contrast-weighted coverage
        e = self.colours.to(videos)[None] - background[:, None]  # (b, k, c) colour directions
        e2 = e.pow(2).sum(-1)  # (b, k)
        if (e2 < MIN_CONTRAST**2).any():
            i, k = (e2 < MIN_CONTRAST**2).nonzero()[0].tolist()
            colour, bg = [round(x, 3) for x in self.colours[k].tolist()], [round(x, 3) for x in background[i].tolist()]
            raise ValueError(f"tracked colour {colour} is indistinguishable from the background {bg} of video {i}; "
                             f"pass colours that differ from it")
        e2 = e2.view(b, 1, -1, 1, 1)
        dots = torch.einsum("btchw,bkc->btkhw", d, e)  # (b, t, k, h, w)
        alpha = (dots / e2).clamp(min=0)  # coverage along each colour direction
        # squared sine of the angle between d and each colour direction (0 for a mix of colour and background)
        d2 = d.pow(2).sum(2, keepdim=True)  # (b, t, 1, h, w)
        sine2 = (d2 - 2 * alpha * dots + alpha.pow(2) * e2).clamp(min=0) / (d2 + 1e-6)
        assign = torch.softmax(-sine2 / self.colour_temperature**2, dim=2)
        return assign * alpha

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t, c, h, w = videos.shape
        masks = self.masks(videos)  # (b, t, k, h, w)
        ys = torch.arange(h, device=videos.device, dtype=videos.dtype) / h  # frame-height units
        xs = torch.arange(w, device=videos.device, dtype=videos.dtype) / h
        area = masks.sum((-2, -1)).transpose(1, 2) / h**2  # (b, k, t)
        cx = (masks.sum(-2) * xs).sum(-1).transpose(1, 2) / h**2 / (area + 1e-8)
        cy = (masks.sum(-1) * ys).sum(-1).transpose(1, 2) / h**2 / (area + 1e-8)
        pos = torch.stack([cx, cy], dim=-1)  # (b, k, t, 2)
        presence = (area.mean(-1) / self.min_area).clamp(max=1.0) ** 2  # (b, k) in [0, 1]

        # acceleration: robust constant-acceleration fit; continuity: how far single frames stray from it
        acc = pos[:, :, 2:] - 2 * pos[:, :, 1:-1] + pos[:, :, :-2]  # (b, k, t-2, 2) at frames 1..t-2
        fit = acc.median(dim=2).values  # (b, k, 2)
        if self.gravity is None:  # unknown magnitude: only demand "down" and no sideways drift
            accel_err = fit[..., 0].abs() + (-fit[..., 1]).clamp(min=0)
            g = fit[..., 1:].clamp(min=0)  # (b, k, 1)
        else:
            accel_err = (fit - fit.new_tensor([0.0, self.gravity])).norm(dim=-1)
            g = torch.full_like(fit[..., 1:], self.gravity)
        deviation = (acc - fit.unsqueeze(2)).norm(dim=-1)  # (b, k, t-2)
        continuity_err = deviation.mean(-1)

        # mass: the area stays constant; |a - m| / (a + m) is bounded, so a briefly occluded object costs little
        typical = area.median(dim=-1, keepdim=True).values
        area_dev = (area - typical).abs() / (area + typical + 1e-8)  # (b, k, t)
        mass_err = area_dev.mean(-1)
        unoccluded = torch.exp(-(area_dev / OCCLUSION_AREA_DEVIATION) ** 2)  # (b, k, t) ~0 where partly hidden

        # energy per frame interval: under constant acceleration the mean velocity over [t, t+1] is exactly the
        # velocity at its midpoint, so E = |u|^2 / 2 - g * y_mid (+ a constant) is exact between contacts
        u = pos[:, :, 1:] - pos[:, :, :-1]  # (b, k, t-1, 2)
        energy = 0.5 * u.pow(2).sum(-1) - g * (pos[:, :, 1:, 1] + pos[:, :, :-1, 1]) / 2  # (b, k, t-1)
        contact = 1 - torch.exp(-(deviation / self.contact_threshold) ** 2)  # (b, k, t-2) at frames 1..t-2
        # A contact inside [t, t+1] disturbs the accelerations at frames t and t+1; at the clip's ends only one of
        # them exists, so there the spike is blamed on the end interval only if its inner neighbour is clean.
        contact = torch.cat([1 - contact[..., 1:2], contact, 1 - contact[..., -2:-1]], dim=-1)  # (b, k, t)
        valid = 1 - contact[..., :-1] * contact[..., 1:]  # (b, k, t-1) soft "no contact inside the interval"
        valid = valid * unoccluded[..., 1:] * unoccluded[..., :-1]
        gain = (energy.unsqueeze(-2) - energy.unsqueeze(-1) - self.energy_margin).clamp(min=0)  # (b, k, i, j)
        later = torch.ones(t - 1, t - 1, device=videos.device, dtype=torch.bool).triu(1)  # j after i
        energy_err = (gain * valid.unsqueeze(-1) * valid.unsqueeze(-2) * later).flatten(-2).max(-1).values

        errors = {"acceleration": accel_err, "continuity": continuity_err, "mass": mass_err, "energy": energy_err}
        errors = {k: _weighted_mean(e, presence) / self.tolerances[k] for k, e in errors.items()}  # (b,) each
        scores = {k: torch.exp(-e) for k, e in errors.items()}
        scores["overall"] = torch.exp(-torch.stack(list(errors.values())).mean(0))  # geometric mean of the scores
        return scores


def _weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """Mean of ``x`` over its last dim weighted by ``weight``; 0 where all weights vanish."""
    return (x * weight).sum(-1) / weight.sum(-1).clamp(min=1e-6)


def _rgb_tensor(value, name: str, rows: bool) -> Tensor:
    """``value`` as a float tensor of RGB rows ``(k, 3)`` (or one colour ``(3,)``) in [0, 1]."""
    tensor = torch.as_tensor(value, dtype=torch.float32)
    shape_ok = tensor.ndim == 2 and tensor.shape[1] == 3 and len(tensor) > 0 if rows else tensor.shape == (3,)
    if not shape_ok or not ((tensor >= 0) & (tensor <= 1)).all():
        layout = "a list of [r, g, b] lists" if rows else "[r, g, b]"
        raise ValueError(f"{name} must be {layout} with values in [0, 1], got {value!r}")
    return tensor


VIDEOPHY = "https://arxiv.org/abs/2406.03520"


@register_reward("physics_learned")
class LearnedPhysicsReward(RewardModel, paper_url=VIDEOPHY):
    """A learned physical-plausibility score (a logit; higher is more plausible), after VideoPhy (arXiv 2406.03520).

    VideoPhy trains an evaluator on human judgements of physical commonsense; this is the small-scale analogue for
    footage where no tracker applies: a spatio-temporal network trained with Bradley-Terry(-with-ties) on pairs of
    true and violated physics. Frames are resized to ``frame_size`` and given two coordinate channels (so positions,
    hence velocities and accelerations, are visible to the convolutions); three strided 3-D convolutions turn the
    clip into one token per frame (the spatial grid flattened, keeping where things are); a temporal transformer
    compares frames across the whole clip (a size or energy change only shows between distant frames); mean and
    max pooling over time (a teleport is one frame) feed the head. ``overall`` equals ``physics``.

    The defaults are the shipped ``physics_learned`` model, trained on toy-world pairs (clean against gravity,
    teleport, size-change and time-reversal violations; visually damaged videos count as ties), so it knows toy-world
    physics only. Prefer the verifiable ``newton`` reward where its assumptions hold.

    Args:
        channels: output channels of the three 3-D convolutions (each halves the frame's height and width).
        frame_size: ``[height, width]`` frames are resized to; a multiple of 8 each.
        width: token width of the temporal transformer.
        temporal_layers: layers of the temporal transformer.
        num_heads: its attention heads.
        max_frames: longest video the time embedding covers.
    """

    dimensions = ("physics",)
    differentiable = True
    min_frames = 4
    license = "apache-2.0"
    score_ranges = {"physics": (None, None), "overall": (None, None)}  # a logit
    expected_fps = 8.0  # tuned on the toy world, rendered at 8 fps

    @property
    def expected_resolution(self) -> tuple[int, int]:
        """The ``frame_size`` frames are resized to (the card's ``expected_resolution``)."""
        return tuple(self.frame_size)

    def __init__(
        self,
        channels: list[int] = (16, 32, 32),
        frame_size: list[int] = (32, 32),
        width: int = 64,
        temporal_layers: int = 2,
        num_heads: int = 4,
        max_frames: int = 64,
    ) -> None:
        super().__init__()
        from torch import nn

        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive integers, got {channels!r}")
        if len(frame_size) != 2 or min(frame_size) < 8 or any(s % 8 for s in frame_size):
            raise ValueError(f"frame_size must be [height, width], multiples of 8, got {frame_size!r}")
        if width % num_heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
        self.frame_size, self.max_frames = tuple(frame_size), max_frames
        layers, c_in = [], 3 + 2  # RGB plus (y, x) coordinates
        for c_out in channels:
            layers += [nn.Conv3d(c_in, c_out, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(min(8, c_out), c_out),
                       nn.GELU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        cells = (frame_size[0] // 8) * (frame_size[1] // 8)
        self.project = nn.Linear(channels[-1] * cells, width)
        self.time_embed = nn.Parameter(torch.randn(max_frames, width) * 0.02)
        self.temporal = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, num_heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True),
            temporal_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(2 * width), nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t, c = videos.shape[:3]
        if t > self.max_frames:
            raise ValueError(f"LearnedPhysicsReward covers at most max_frames={self.max_frames} frames, got {t}")
        h, w = self.frame_size
        frames = videos.flatten(0, 1)  # (b t, c, h, w)
        if frames.shape[-2:] != self.frame_size:
            frames = torch.nn.functional.interpolate(frames, size=self.frame_size, mode="bilinear",
                                                     align_corners=False, antialias=True)
        x = frames.reshape(b, t, c, h, w).transpose(1, 2)  # (b, c, t, h, w)
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, 1, h, 1).expand(b, 1, t, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, 1, w).expand(b, 1, t, h, w)
        x = self.convs(torch.cat([x, ys, xs], dim=1))  # (b, c', t, h/8, w/8)
        tokens = self.project(x.transpose(1, 2).flatten(2)) + self.time_embed[:t]  # (b, t, d)
        tokens = self.temporal(tokens)
        score = self.head(torch.cat([tokens.mean(1), tokens.max(1).values], dim=-1)).squeeze(-1)
        return {"physics": score, "overall": score}
