"""Copy metrics/ablations.md (written by `magicseg ablate`) into README.md's Ablations section."""

from pathlib import Path

root = Path(__file__).resolve().parents[1]
readme = root / "README.md"
table = (root / "metrics/ablations.md").read_text().strip()
text = readme.read_text()
head, rest = text.split("<!-- ablations:start -->")
_, tail = rest.split("<!-- ablations:end -->")
readme.write_text(f"{head}<!-- ablations:start -->\n{table}\n<!-- ablations:end -->{tail}")
print("README.md ablation tables refreshed from metrics/ablations.md")
