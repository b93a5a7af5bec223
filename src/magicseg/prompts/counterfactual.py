"""Counterfactual twins of prompts: every mention of the classes replaced by "nothing".

Whole words, case-insensitive, multi-word names, plurals (regular and common irregular) and
possessives; a leading article or count word goes with the name ("a red kite" -> "nothing").
:func:`literal_counterfactual` is the published rewrite (``prompts.cf_rewrite: literal``): each
class name as written, whole word, case-insensitive, and nothing else.
"""

from __future__ import annotations

import re
from functools import lru_cache

IRREGULAR = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "wolf": "wolves",
    "loaf": "loaves",
    "calf": "calves",
    "half": "halves",
    "scarf": "scarves",
    "life": "lives",
    "wife": "wives",
    "elf": "elves",
    "cactus": "cacti",
    "fungus": "fungi",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "bison": "bison",
    "moose": "moose",
    "aircraft": "aircraft",
    "series": "series",
}
DETERMINERS = (
    "a",
    "an",
    "the",
    "one",
    "two",
    "three",
    "four",
    "five",
    "several",
    "some",
    "many",
    "a few",
    "a pair of",
    "a couple of",
    "a group of",
    "his",
    "her",
    "their",
    "its",
    "this",
    "that",
    "these",
    "those",
)
NOTHING = "nothing"


def plural(word: str) -> str:
    """English plural of one word (irregulars, -y -> -ies, sibilants -> -es)."""
    low = word.lower()
    if low in IRREGULAR:
        return IRREGULAR[low]
    if re.search(r"[^aeiou]y$", low):
        return word[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", low):
        return word + "es"
    if re.search(r"[^aeiou]o$", low) and low not in {"photo", "piano", "radio", "video"}:
        return word + "es"
    return word + "s"


def name_forms(name: str) -> list[str]:
    """Singular and plural surface forms of a (possibly multi-word) class name."""
    words = name.split()
    forms = {name, " ".join(words[:-1] + [plural(words[-1])])}
    if name.endswith("s"):  # "skis", "scissors": also accept the singular-looking form
        forms.add(name[:-1])
    return sorted(forms, key=len, reverse=True)


@lru_cache(maxsize=4096)
def _pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    forms: list[str] = []
    for n in names:
        forms.extend(name_forms(n.lower()))
    forms = sorted(set(forms), key=len, reverse=True)  # longest first: "school bus" before "bus"
    alts = "|".join(r"\s+".join(map(re.escape, f.split())) for f in forms)
    dets = "|".join(r"\s+".join(map(re.escape, d.split())) for d in DETERMINERS)
    return re.compile(
        rf"(?<![\w-])(?:(?:{dets})\s+)?(?:{alts})(?:'s|s')?(?![\w-])", flags=re.IGNORECASE
    )


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` mentions ``name`` (any form, whole words)."""
    return bool(_pattern((name,)).search(text))


def make_counterfactual(text: str, names: list[str] | tuple[str, ...]) -> str:
    """Replace every mention of every class in ``names`` by "nothing".

    >>> make_counterfactual("Two School Buses pass a red kite's shadow", ["school bus", "red kite"])
    'nothing pass nothing shadow'
    """
    if not names:
        return text
    out = _pattern(tuple(names)).sub(NOTHING, text)
    return re.sub(r"[ \t]{2,}", " ", out)


def literal_counterfactual(text: str, names: list[str] | tuple[str, ...]) -> str:
    """The published rewrite: each class name, in turn, replaced by "nothing" where it stands
    as a whole word (``\\b``), case-insensitive; plurals, possessive endings and articles stay,
    and a hyphenated word loses its class part ("hot-dog" -> "hot-nothing").

    >>> literal_counterfactual("A Dog and two dogs near the dog's bowl", ["dog"])
    "A nothing and two dogs near the nothing's bowl"
    """
    for name in names:
        # \b, also where a full LVIS name starts or ends with a parenthesis
        text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", NOTHING, text, flags=re.IGNORECASE)
    return text


REWRITES = {"ours": make_counterfactual, "literal": literal_counterfactual}
"""``prompts.cf_rewrite`` -> the function that makes a counterfactual prompt."""
