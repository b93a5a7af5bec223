"""The ``magicseg`` command line: ``predict`` with a trained checkpoint, ``info`` on this setup,
``check`` (the pre-flight of a params file), ``export`` of the kept dataset (COCO JSON, Hugging
Face datasets), ``ablate`` (grids of DVC experiments over several seeds, one table).

User errors (:class:`magicseg.core.errors.MagicsegError`) print one line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from magicseg.core.errors import ConfigError, DataError
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
        list[str] | None,
        typer.Option(
            help='Prompt template, repeatable: "a photo of a {}."; replaces the text '
            "encoder's own templates (default: the model's training templates)"
        ),
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
    templates = tuple(template) if template else None
    if templates and any(t.count("{}") != 1 for t in templates):
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
def check(
    params: Annotated[Path, typer.Option(help="The composed params to check.")] = Path(
        "params.yaml"
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            help="Compose the params from --conf with this Hydra override instead, as "
            "`dvc exp run -S` does (repeatable: -S profile=paper -S train.steps=2000).",
        ),
    ] = None,
    conf: Annotated[Path, typer.Option(help="The Hydra config directory for -S.")] = Path("conf"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the LLM endpoint.")] = 10.0,
) -> None:
    """Pre-flight of PARAMS before a long run: every model reference, the LLM endpoint and
    its key, every enabled benchmark root and layout, free disk for the planned dataset, a GPU
    where a model stage runs (with a training-time estimate). One line per check (ok, warning,
    error); exit status 2 if any failed. The `check` stage of dvc.yaml runs the same."""
    from magicseg.core.config import load_params
    from magicseg.preflight import preflight

    if set_:
        p = load_params(_compose(conf, set_))
    else:
        p = load_params(params)
    checks = preflight(p, echo=typer.echo, timeout=timeout)
    warnings = sum(c.status == "warning" for c in checks)
    typer.echo(f"check: passed ({len(checks)} checks, {warnings} warnings)")


def _compose(conf: Path, overrides: list[str]) -> Path:
    """``conf/config.yaml`` composed with ``overrides`` (DVC's Hydra composition, as
    ``dvc exp run -S`` does) into a temporary params file; ConfigError for a bad override."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    if not (conf / "config.yaml").is_file():
        raise ConfigError(f"--conf: {conf}/config.yaml not found (run from the repository root)")
    out = Path(tempfile.mkdtemp(prefix="magicseg-check-")) / "params.yaml"
    try:
        compose_and_dump(
            out, str(conf.resolve()), None, "config", str(conf.resolve().parent), overrides
        )
    except Exception as err:  # noqa: BLE001 - Hydra raises many kinds for a bad override
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"-S: cannot compose {' '.join(overrides)} ({first})") from None
    return out


HF_ONLY = (
    "generated",
    "labels",
    "params",
    "metrics",
    "lock",
    "include_dropped",
    "shard_size",
    "push_to_hub",
    "private",
)


@app.command()
@user_errors
def export(
    ctx: typer.Context,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="coco: COCO JSON with RLE masks; hf: a Hugging Face dataset (Parquet shards, "
            "a DatasetDict saved to disk, a dataset card).",
        ),
    ] = "coco",
    out: Annotated[
        Path | None,
        typer.Option(help="A JSON file (coco; export/coco.json) or a directory (hf; export/hf)."),
    ] = None,
    filtered: Annotated[Path, typer.Option(help="filter stage output")] = Path("data/filter"),
    vocab: Annotated[Path, typer.Option(help="vocabulary stage output")] = Path("data/vocabulary"),
    generated: Annotated[
        Path, typer.Option(help="hf: generate stage output (counterfactual prompts, seeds)")
    ] = Path("data/generate"),
    labels: Annotated[
        Path, typer.Option(help="hf: label stage output (the dropped samples)")
    ] = Path("data/label"),
    params: Annotated[
        Path, typer.Option(help="hf: the params the data was made with (card provenance)")
    ] = Path("params.yaml"),
    metrics: Annotated[
        Path, typer.Option(help="hf: the run's metrics/*.json (card figures)")
    ] = Path("metrics"),
    lock: Annotated[Path, typer.Option(help="hf: dvc.lock (md5s of the data)")] = Path("dvc.lock"),
    include_dropped: Annotated[
        bool, typer.Option(help="hf: also the dropped samples, with a `kept` column")
    ] = False,
    shard_size: Annotated[
        str, typer.Option(help="hf: largest Parquet shard (500MB, 64KiB, ...)")
    ] = "500MB",
    push_to_hub: Annotated[
        str | None,
        typer.Option(help="hf: push to this hub dataset repo ('org/name'); needs a token"),
    ] = None,
    private: Annotated[bool, typer.Option(help="hf: make the pushed repo private")] = False,
) -> None:
    """Export the kept dataset for other toolkits: COCO JSON (RLE masks) or a Hugging Face
    dataset with its card (optionally pushed to the hub)."""
    # 1. Options that do not apply, checked before any work.
    if fmt not in ("coco", "hf"):
        raise ConfigError(f"--format: unknown format {fmt!r} (available: coco, hf)")
    given = [  # by name: typer may vendor its own click
        n
        for n in HF_ONLY
        if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
    ]
    if fmt == "coco" and given:
        raise ConfigError(f"--{given[0].replace('_', '-')}: applies to --format hf only")
    if private and push_to_hub is None:
        raise ConfigError("--private: applies to --push-to-hub only")

    if fmt == "coco":
        from magicseg.export.coco import export_coco

        out = out or Path("export/coco.json")
        n = export_coco(filtered, vocab, out)
        typer.echo(f"export: {n['images']} images, {n['annotations']} annotations -> {out}")
        return

    # 2. hf: the size, the hub and the provenance, checked before the export's work.
    from magicseg.export.card import collect_run_info, data_backends
    from magicseg.export.hf import export_hf, parse_size
    from magicseg.export.push import check_push, push_export

    out = out or Path("export/hf")
    budget = parse_size(shard_size)
    token = check_push(push_to_hub) if push_to_hub else None
    run = collect_run_info(
        params, metrics, lock, data_backends(generated, labels), repo_id=push_to_hub
    )

    # 3. The export, then the push.
    res = export_hf(
        filtered,
        vocab,
        generated,
        out,
        label_dir=labels,
        include_dropped=include_dropped,
        shard_size=budget,
        card=run,
    )
    state = (
        "up to date, card refreshed"
        if res.up_to_date
        else f"{res.written} shard(s) written, {res.shards - res.written} reused"
    )
    typer.echo(
        f"export: {res.rows} samples ({res.kept} kept) in {res.shards} Parquet shard(s), "
        f"{res.bytes / 1e6:.1f} MB -> {out} ({state}; {res.seconds:.1f} s)"
    )
    if push_to_hub:
        url = push_export(out, push_to_hub, private, token)
        typer.echo(f"pushed to {push_to_hub}: {url}")


@app.command()
@user_errors
def ablate(
    grid: Annotated[
        str,
        typer.Option(help="paper, sampling, masks, spread, or all (comma-separated: paper,masks)."),
    ],
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Global seeds, comma-separated, for every grid (default: each grid's own: "
            "paper 0-4, sampling and masks 0-2)."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Experiments run at once by DVC's queue.")] = 1,
    dry_run: Annotated[
        bool, typer.Option(help="Print the plan and the dvc commands; queue nothing.")
    ] = False,
    collect: Annotated[
        bool,
        typer.Option(
            help="Queue and run nothing: write the results of the experiments already finished "
            "(a partial grid, each cell with the seeds it has) and list the rest as not run."
        ),
    ] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            help="Run nothing: recompute the tables of the grids already in OUT from their "
            "per-seed values and write OUT, the table and the plots again."
        ),
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Results JSON; the Markdown table goes beside it (.md).")
    ] = Path("metrics/ablations.json"),
    plots: Annotated[Path, typer.Option(help="Directory of the plots' CSV files.")] = Path(
        "plots/ablations"
    ),
) -> None:
    """Run a named grid of DVC experiments, every cell on the same global seeds (dvc exp run
    --queue, in temporary copies: the workspace is not touched), reuse the finished ones, and
    write per cell mean, std, n and the per-seed values, and the effects as paired differences
    with 95% t-intervals, to OUT, a Markdown table and a DVC plot. Run it from the repository
    root, with everything committed."""
    from magicseg.ablate import ablate as run_ablate
    from magicseg.ablate import report_only as run_report_only

    names = [g.strip() for g in grid.split(",") if g.strip()]
    if report_only:
        if seeds is not None or dry_run or collect:
            raise ConfigError(
                "--report-only: runs nothing; leave out --seeds, --dry-run and --collect"
            )
        run_report_only(names, out, plots=plots, echo=typer.echo)
        return
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(
                f"--seeds: comma-separated integers, like 0,1,2 (got {seeds!r})"
            ) from None
    outcome = run_ablate(
        names, seed_list, jobs, dry_run, out, collect=collect, plots=plots, echo=typer.echo
    )
    if outcome.failed:
        raise DataError(
            f"ablate: {len(outcome.failed)} experiment(s) did not finish "
            f"({', '.join(p.name for p in outcome.failed[:4])}): their logs are above; the "
            "table holds the finished ones (n per cell); run again to retry them"
        )


if __name__ == "__main__":
    app()
