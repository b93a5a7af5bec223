"""The ``magicseg`` command line: ``predict`` with a trained checkpoint, ``info`` on this setup.

User errors (:class:`magicseg.core.errors.MagicsegError`) print one line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from magicseg.core.errors import ConfigError
from magicseg.core.stage import user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
@user_errors
def predict(
    images: Annotated[
        list[str], typer.Argument(help="Image files, folders or glob patterns ('imgs/**/*.jpg').")
    ],
    classes: Annotated[str, typer.Option(help='Comma-separated class names: "a,b,c".')],
    checkpoint: Annotated[Path, typer.Option(help="A model.pt written by the train stage.")],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("predictions"),
    bg_threshold: Annotated[
        float | None, typer.Option(help="Background below this class probability.")
    ] = None,
    short_side: Annotated[
        int | None, typer.Option(help="Resize each image's short side to this first.")
    ] = None,
    window: Annotated[
        int | None, typer.Option(help="Sliding-window size in pixels (large images).")
    ] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride.")] = None,
    template: Annotated[
        list[str] | None, typer.Option(help='Prompt template, repeatable: "a photo of a {}."')
    ] = None,
) -> None:
    """Segment IMAGES into CLASSES: writes <out>/<name>.mask.png (class indices: 0 =
    background, k = the k-th class of --classes) and <name>.overlay.png (with a legend;
    images under 256 px are enlarged there)."""
    import numpy as np

    from magicseg.core.devices import resolve_device
    from magicseg.core.io import read_image, write_mask
    from magicseg.inference import Predictor, SlidingPredictor, expand_inputs
    from magicseg.model import load_checkpoint
    from magicseg.viz import class_legend, overlay, palette, upscale, write_gallery

    # 1. Check the inputs before loading anything heavy.
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise ConfigError("--classes: give at least one class name")
    if len(set(names)) != len(names):
        raise ConfigError("--classes: duplicate class names")
    templates = tuple(template or ("{}",))
    if any(t.count("{}") != 1 for t in templates):
        raise ConfigError("--template: each template needs exactly one {}")
    paths = expand_inputs(images)

    # 2. Model and class embeddings.
    predictor = SlidingPredictor(
        Predictor(load_checkpoint(checkpoint), device=resolve_device("auto", "predict")),
        short_side,
        window,
        stride,
        bg_threshold,
        templates,
    )
    predictor.set_classes(names)
    colours = palette(len(names))

    # 3. One image at a time (sizes may differ).
    for path in paths:
        image = read_image(path)
        mask = predictor(image)[0].cpu().numpy()
        write_mask(out / f"{path.stem}.mask.png", mask, len(names))
        shown = upscale(overlay(image, mask, colours), max(1, 256 // max(image.shape[:2])))
        key = class_legend([mask], names, colours)
        write_gallery(out / f"{path.stem}.overlay.png", [[shown]], legend_items=key)
        present = [int(c) for c in np.unique(mask) if c > 0]
        areas = {names[c - 1]: round(float((mask == c).mean()), 4) for c in present}
        typer.echo(f"{path}: {json.dumps(areas)}")


@app.command()
@user_errors
def info(
    params: Annotated[Path, typer.Option(help="params.yaml to read the profile from.")] = Path(
        "params.yaml"
    ),
) -> None:
    """The profile in params.yaml (if present), the registered backends, and which models can
    run offline here."""
    import magicseg
    from magicseg.core.config import load_params
    from magicseg.generate import GENERATORS
    from magicseg.label import LABELERS
    from magicseg.model import MODELS, TEXT_ENCODERS, available_offline
    from magicseg.prompts.stage import WRITERS

    typer.echo(f"magicseg {magicseg.__version__}")
    if params.is_file():
        p = load_params(params)
        typer.echo(
            f"profile: {p.profile} ({params}): vocabulary={p.vocabulary.source}, "
            f"prompts={p.prompts.writer}, generate={p.generate.backend}, "
            f"label={p.label.backend}, train={p.train.architecture}"
        )
    else:
        typer.echo(f"profile: none ({params} not found)")
    for kind, reg in (
        ("prompt writers", WRITERS),
        ("generators", GENERATORS),
        ("labelers", LABELERS),
        ("models", MODELS),
        ("text encoders", TEXT_ENCODERS),
    ):
        typer.echo(f"{kind}: {', '.join(reg.names())}")
    offline = available_offline()
    typer.echo(
        "models available offline: "
        + ", ".join(f"{k} ({'yes' if v else 'no'})" for k, v in sorted(offline.items()))
    )


@app.command()
@user_errors
def export(
    filtered: Path = typer.Option(Path("data/filter"), help="filter stage output"),
    vocab: Path = typer.Option(Path("data/vocabulary"), help="vocabulary stage output"),
    out: Path = typer.Option(Path("export/coco.json"), help="output JSON"),
    fmt: str = typer.Option("coco", "--format", help="export format (coco)"),
) -> None:
    """Export the kept dataset for other toolkits (COCO JSON with RLE masks)."""
    from magicseg.core.errors import ConfigError
    from magicseg.export import export_coco

    if fmt != "coco":
        raise ConfigError(f"--format: unknown format {fmt!r} (available: coco)")
    n = export_coco(filtered, vocab, out)
    typer.echo(f"export: {n['images']} images, {n['annotations']} annotations -> {out}")


if __name__ == "__main__":
    app()
