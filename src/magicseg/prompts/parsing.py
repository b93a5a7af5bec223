"""What LLM writers ask for, and how their free-form answers become a list of descriptions.

``request_messages`` builds the chat request (the paper's recipe: N descriptions that each
contain the given 1-2 classes in a complex, non-monotonous background, diverse scenarios,
detailed attributes, every example different). ``parse_descriptions`` reads numbered lists
("1." "2)" "(3)"), bulleted lists ("-", "*", "•"), JSON (a list of strings, a list of objects
with a text field, or an object holding such a list, fenced or not) and, as a last resort,
one description per line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

SYSTEM = (
    "You write prompts for a text-to-image model that builds a segmentation dataset. "
    "You follow the requested format exactly."
)

_MARKER = re.compile(
    r"^\s*(?:\(?\d{1,3}\s*[.):\]]|\d{1,3}\s*-\s|[-*•·–]|#{1,4}\s*\d{1,3}[.):]?"
    r"|(?:description|prompt|scene|example)\s*#?\d{1,3}\s*[:.\-–])\s*",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^(?:description|prompt|scene|example)\s*#?\d*\s*[:.\-–]\s*", re.IGNORECASE)
_TITLE = re.compile(r"^([^.:!?]{1,60}):\s+(?=\S)")
_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_TEXT_KEYS = ("description", "prompt", "text", "caption", "scene")


def _objects(classes: Sequence[str]) -> str:
    quoted = [f'"{c}"' for c in classes]
    return " and ".join(quoted)


def request_messages(classes: Sequence[str], n: int) -> list[dict[str, str]]:
    """Chat messages asking for ``n`` numbered descriptions that each contain all ``classes``."""
    both = "both objects" if len(classes) > 1 else "the object"
    user = (
        f"Objects to include: {_objects(classes)}.\n"
        f"Write {n} different descriptions of photographs that each contain {both}.\n"
        "Requirements:\n"
        f"- Name {both} explicitly, with exactly these words, in every description.\n"
        "- Put them in a complex, non-monotonous background full of other things "
        "(no plain, empty or studio backgrounds).\n"
        "- Use diverse scenarios: places, times of day, weather, viewpoints.\n"
        f"- Give detailed attributes of {both}: colour, size, pose, action.\n"
        "- Make every description clearly different from the others.\n"
        "- One or two sentences each, at most 60 words.\n"
        f"Answer with a numbered list from 1 to {n}, one description per item, and nothing else."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def counterfactual_messages(text: str, classes: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking to rewrite ``text`` without the ``classes`` (the counterfactual)."""
    user = (
        f"Rewrite the description below so that the scene no longer contains "
        f"{_objects(classes)}: remove them and every detail that only describes them, keep "
        "everything else (background, lighting, other things, camera) unchanged, and do not "
        "mention the removed objects at all.\n"
        "Answer with the rewritten description only.\n\n"
        f"Description: {text}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _clean(item: str) -> str:
    item = item.replace("**", "").replace("__", "")
    item = _MARKER.sub("", item, count=1)
    item = _LABEL.sub("", item, count=1)
    title = _TITLE.match(item)
    if title and len(title.group(1).split()) <= 6 and len(item) > title.end() + 20:
        item = item[title.end() :]
    item = " ".join(item.split())
    return item.strip(" \"'`“”‘’")


def _from_json(value: object) -> list[str] | None:
    if isinstance(value, dict):
        for key in _TEXT_KEYS:
            if isinstance(value.get(key), str):
                return [value[key]]
        lists = [v for v in value.values() if isinstance(v, list)]
        return _from_json(lists[0]) if lists else None
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict):
                out.extend(_from_json(v) or [])
        return out
    return None


def _try_json(text: str) -> list[str] | None:
    candidates = [text]
    for open_, close in (("[", "]"), ("{", "}")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i : j + 1])
    for cand in candidates:
        try:
            items = _from_json(json.loads(cand))
        except ValueError:
            continue
        if items:
            return items
    return None


def _from_lines(text: str) -> list[str]:
    lines = text.splitlines()
    if any(_MARKER.match(ln) and _MARKER.sub("", ln, count=1).strip() for ln in lines):
        items: list[str] = []
        open_item = False  # a continuation line joins the item above it unless a blank line
        for ln in lines:  # separates them; text before the first item is a preamble
            if _MARKER.match(ln) and _MARKER.sub("", ln, count=1).strip():
                items.append(ln)
                open_item = True
            elif not ln.strip():
                open_item = False
            elif open_item:
                items[-1] += " " + ln
        return items
    return [ln for ln in lines if ln.strip() and not ln.rstrip().endswith(":")]


def parse_descriptions(text: str | None, n: int | None = None) -> list[str]:
    """Descriptions in an LLM answer, cleaned (no markers, labels, quotes), unique, in order,
    at most ``n``. A malformed or empty answer gives ``[]``."""
    if not text or not text.strip():
        return []
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    items = _try_json(body.strip())
    if items is None:
        items = _from_lines(body)
    out: list[str] = []
    for item in items:
        clean = _clean(item)
        if clean and len(clean.split()) >= 2 and clean not in out:
            out.append(clean)
    return out[:n] if n is not None else out


def parse_rewrite(text: str | None) -> str | None:
    """The single description of a counterfactual rewrite, or None when the answer is empty."""
    items = parse_descriptions(text)
    if not items:
        return None
    return items[0] if len(items) == 1 else " ".join(items)
