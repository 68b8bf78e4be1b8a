"""Architecture description shared by the exporter (torch) and the device runner (no torch).

One frozen dataclass describes a ViT; the named presets are the sizes `export --model` knows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vqt_edge.errors import UserError


@dataclass(frozen=True)
class ViTArch:
    """A pre-norm ViT with a CLS token and learned position embeddings (the timm/Google layout)."""

    depth: int
    dim: int
    heads: int
    mlp_dim: int
    patch: int
    image_size: int
    channels: int = 3
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if min(self.depth, self.dim, self.heads, self.mlp_dim, self.patch, self.image_size) <= 0:
            raise UserError(f"architecture sizes must be positive: {self}")
        if self.dim % self.heads:
            raise UserError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.image_size % self.patch:
            raise UserError(f"image size {self.image_size} is not a multiple of patch {self.patch}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_tokens(self) -> int:
        """N: the CLS token plus one token per patch."""
        return 1 + (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTArch:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"depth", "dim", "heads", "mlp_dim", "patch", "image_size"} - set(d)
        if missing:
            raise UserError(f"architecture is missing {sorted(missing)}")
        try:
            values: dict[str, Any] = {k: (float(v) if k == "eps" else int(v)) for k, v in d.items() if k in names}
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise UserError(f"bad architecture {d!r}: {e}") from None


# The ViT family of the paper (patch 16, 224 px) plus the small backbone this project ships.
PRESETS: dict[str, ViTArch] = {
    "vit_ti16": ViTArch(depth=12, dim=192, heads=3, mlp_dim=768, patch=16, image_size=224),
    "vit_s16": ViTArch(depth=12, dim=384, heads=6, mlp_dim=1536, patch=16, image_size=224),
    "vit_b16": ViTArch(depth=12, dim=768, heads=12, mlp_dim=3072, patch=16, image_size=224),
    "vit_l16": ViTArch(depth=24, dim=1024, heads=16, mlp_dim=4096, patch=16, image_size=224),
    # The small backbone pre-trained by examples/pretrain_fmnist.py and shipped in vqt_edge/pretrained/.
    "vit_fmnist": ViTArch(depth=6, dim=128, heads=4, mlp_dim=512, patch=4, image_size=28),
}


def resolve_arch(name: str | None, **overrides: int | None) -> ViTArch:
    """A preset by name, with any non-None override applied; no name means all sizes are given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if name is None:
        return ViTArch.from_dict(given)
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **given)
