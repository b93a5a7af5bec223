"""Prompt templates for class names (a class's text feature: the mean over its templates)."""

ZEGCLIP_TEMPLATES = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)
"""The 15 templates of ZegCLIP (and the published MagicSeg code: training text features, and
the PASCAL Context test features, ``get_embedding.ipynb: multi_templete``)."""

TEMPLATES = {"zegclip15": ZEGCLIP_TEMPLATES, "single": ("a photo of a {}.",)}
"""``train.clip.templates`` -> the templates the clip text encoder fills class names into."""
