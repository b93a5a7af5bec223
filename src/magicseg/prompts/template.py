"""The offline template prompt writer: a seeded grammar of rich, busy scene descriptions.

``style: rich`` composes subject attributes (size, pose, action, placement), a scene with
background clutter, weather/lighting and a camera phrase; every description of a request is
different. ``style: plain`` writes "a photo of a {class}" (the paper's ablation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magicseg.prompts.base import PromptRequest

SIZES = ("tiny", "small", "", "", "large", "huge")
POSES = (
    "tilted to one side",
    "standing upright",
    "lying on its side",
    "half turned away",
    "seen from slightly above",
    "leaning against a post",
    "caught mid-motion",
    "resting",
    "floating just above the ground",
    "partly in shadow",
)
PLACES = (
    "on the left",
    "on the right",
    "in the middle",
    "near the top",
    "near the bottom",
    "in the foreground",
    "slightly off-centre",
)
SCENES = (
    "a crowded market street with stalls and hanging signs",
    "a misty pine forest with mossy rocks and fallen branches",
    "a sunlit beach with driftwood, shells and footprints in the sand",
    "a cluttered kitchen counter with jars, cutting boards and spices",
    "a snowy mountain trail lined with frosted shrubs",
    "a busy city park with benches, lamp posts and scattered leaves",
    "a dusty desert canyon with cracked red rocks",
    "a rainy harbour pier with ropes, crates and puddles",
    "a messy office desk covered with papers, cables and mugs",
    "a flower garden with gravel paths and a wooden fence",
    "a grassy field with hay bales and distant hills",
    "a cosy living room with patterned rugs and bookshelves",
    "a night street lit by neon signs and wet asphalt",
    "a lakeside dock with reeds, boats and rippling water",
    "an old brick alley with graffiti, pipes and trash bins",
    "a school playground with painted lines and climbing frames",
)
LIGHTS = (
    "in warm golden-hour light",
    "under a cloudy grey sky",
    "in harsh midday sun",
    "in soft morning fog",
    "under flickering street lights",
    "with long dramatic shadows",
    "in cool blue dusk light",
    "with dappled light through leaves",
)
CAMERAS = (
    "photographed with a wide-angle lens",
    "shot on a 35mm film camera",
    "high-detail photo",
    "candid smartphone photo",
    "sharp DSLR photo, shallow depth of field",
    "documentary photo",
)
ACTIONS = (
    "next to",
    "in front of",
    "behind",
    "beside",
    "far from",
    "above",
    "below",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


class TemplateWriter:
    """Offline prompt writer (no model); deterministic given each request's seed."""

    name = "template"

    def __init__(self, style: str = "rich") -> None:
        if style not in ("rich", "plain"):
            raise ValueError(f"style must be 'rich' or 'plain', got {style!r}")
        self.style = style

    def write(self, requests: Sequence[PromptRequest]) -> list[list[str]]:
        """One list of ``request.n`` descriptions per request, each mentioning all its classes."""
        return [self._write_one(r) for r in requests]

    def _write_one(self, req: PromptRequest) -> list[str]:
        if self.style == "plain":
            return [self._plain(req.classes)] * req.n
        rng = np.random.default_rng(req.seed)
        out: list[str] = []
        seen: set[str] = set()
        for _ in range(req.n * 50):
            text = self._rich(req.classes, rng)
            if text not in seen:
                seen.add(text)
                out.append(text)
            if len(out) == req.n:
                return out
        raise RuntimeError(f"grammar too small for {req.n} distinct prompts")

    @staticmethod
    def _plain(classes: Sequence[str]) -> str:
        return "a photo of " + " and ".join(_article(c) for c in classes)

    @staticmethod
    def _subject(cls: str, rng: np.random.Generator) -> str:
        size = str(rng.choice(SIZES))
        pose = str(rng.choice(POSES))
        phrase = f"{size} {cls}".strip()
        return f"{_article(phrase)} {pose}"

    def _rich(self, classes: Sequence[str], rng: np.random.Generator) -> str:
        first = self._subject(classes[0], rng)
        if len(classes) > 1:
            second = self._subject(classes[1], rng)
            subject = f"{first} {rng.choice(ACTIONS)} {second}"
        else:
            subject = f"{first} {rng.choice(PLACES)}"
        scene = str(rng.choice(SCENES))
        light = str(rng.choice(LIGHTS))
        camera = str(rng.choice(CAMERAS))
        text = f"{subject}, in {scene}, {light}, {camera}"
        return text[0].upper() + text[1:]
