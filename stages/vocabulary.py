"""Stage `vocabulary`: class names -> data/vocabulary/manifest.parquet."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.io import write_manifest
from magicseg.core.stage import user_errors
from magicseg.core.vocabulary import build_vocabulary


@user_errors
def main(out: Path = typer.Option(...), params_file: Path = Path("params.yaml")) -> None:
    p = load_params(params_file)
    v = p.vocabulary
    vocab = build_vocabulary(v.source, v.file, v.holdout, v.limit, seed=p.seed)
    write_manifest(out, vocab.to_frame())
    print(f"vocabulary: {len(vocab)} classes from {v.source}, {len(vocab.holdout)} held out")


if __name__ == "__main__":
    typer.run(main)
