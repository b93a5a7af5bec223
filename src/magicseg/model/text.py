"""Text encoders: class names -> frozen feature vectors. The MiniLM tower lives with the
miniature CLIP it belongs to (:mod:`magicseg.miniclip.text`); re-exported here."""

from __future__ import annotations

from magicseg.miniclip.text import HFMeanPoolEncoder, minilm_path

__all__ = ["HFMeanPoolEncoder", "minilm_path"]
