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
    vocab = build_vocabulary(
        v.source,
        v.file,
        holdout_combination=v.holdout_combination,
        holdout_novel_words=v.holdout_novel_words,
        limit=v.limit,
        seed=v.holdout_seed_for(p.seed),
    )
    write_manifest(out, vocab.to_frame())
    combination, novel = (vocab.heldout_of_kind(k) for k in ("combination", "novel"))
    print(
        f"vocabulary: {len(vocab)} classes from {v.source}, {len(vocab.trainable)} to train; "
        f"held out: {len(combination)} new combinations, {len(novel)} with the novel words "
        f"{', '.join(vocab.novel_words) or '-'}"
    )


if __name__ == "__main__":
    typer.run(main)
