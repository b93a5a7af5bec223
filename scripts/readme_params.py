"""Refresh the params reference table in README.md from the typed params classes."""

from pathlib import Path

from magicseg.core.config import params_reference

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- params-reference:start -->")
_, tail = rest.split("<!-- params-reference:end -->")
table = "\n".join(
    ["| key | default (offline) | allowed | meaning |", "|---|---|---|---|", *params_reference()]
)
readme.write_text(
    f"{head}<!-- params-reference:start -->\n{table}\n<!-- params-reference:end -->{tail}"
)
print("README.md params reference refreshed")
