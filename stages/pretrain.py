"""Stage `pretrain`: the miniature CLIP (an image tower trained against the frozen MiniLM text
tower on a procedural image-caption corpus) -> pretrained/miniclip, and its zero-shot report."""

from pathlib import Path

import typer

from magicseg.core.config import load_params
from magicseg.core.io import write_json
from magicseg.core.stage import user_errors
from magicseg.core.vocabulary import HOLDOUT_KINDS, build_vocabulary


@user_errors
def main(
    out: Path = typer.Option(..., help="checkpoint directory (committed to git)"),
    metrics: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
) -> None:
    from magicseg.miniclip.pretrain import pretrain

    p = load_params(params_file)
    v = p.vocabulary
    vocab = build_vocabulary(
        v.source,
        v.file,
        holdout_combination=v.holdout_combination,
        holdout_novel_words=v.holdout_novel_words,
        limit=v.limit,
        seed=p.seed,
    )
    kinds = {kind: vocab.heldout_of_kind(kind) for kind in HOLDOUT_KINDS}
    report = pretrain(p.pretrain, out, list(vocab.names), set(vocab.holdout), kinds)
    write_json(metrics, report)
    print(
        f"pretrain: zero-shot top-1 {report['top1']} (seen {report.get('top1_seen')}, "
        f"held out {report.get('top1_heldout')})"
    )


if __name__ == "__main__":
    typer.run(main)
