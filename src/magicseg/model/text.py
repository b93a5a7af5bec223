"""Text encoders: class names -> frozen feature vectors. The MiniLM tower lives with the
miniature CLIP it belongs to (:mod:`magicseg.miniclip.text`); the segmenters' encoder adds the
templates to it (the encoder owns its templates: callers pass bare class names)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from magicseg.miniclip.text import HFMeanPoolEncoder as _MiniLMTower
from magicseg.miniclip.text import minilm_path

__all__ = ["HFMeanPoolEncoder", "minilm_path"]


class HFMeanPoolEncoder(_MiniLMTower):
    """The MiniLM tower with templates: ``self.templates`` (default the bare name) wrap each
    class name, so a name is templated exactly once, here."""

    def __init__(self, path: str | Path, name: str = "minilm", batch_size: int = 256) -> None:
        super().__init__(path, name, batch_size)
        self.templates: tuple[str, ...] = ("{}",)

    @torch.no_grad()
    def encode(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Bare class names -> ``len(names) x dim`` float32, L2-normalised; with ``templates``
        (each with one ``{}``, replacing ``self.templates`` = the bare name), the normalised
        mean of the name filled into each template once."""
        tpls = self.templates if templates is None else tuple(templates)
        if not names:
            return torch.zeros(0, self.dim)
        texts = [t.format(n) for t in tpls for n in names]
        feats = super().encode(texts).view(len(tpls), len(names), -1)
        if len(tpls) == 1:
            return feats[0]
        return torch.nn.functional.normalize(feats.mean(0), dim=-1)
