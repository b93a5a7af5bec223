"""The dataset card (``README.md``) of a Hugging Face export: the hub's YAML metadata, then what
the set is, how it was made, its classes, the pipeline's own figures and how to load it.

Provenance comes from the params the data was made with (:func:`collect_run_info`): the
generator, labeler and LLM ids, a digest of the composed params (sha256 of their canonical
JSON), the ``dvc.lock`` md5s of the data outputs, and every ``metrics/*.json`` of the run,
rendered as tables whatever numbers they hold.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from magicseg.core.config import Params, load_params, params_to_dict
from magicseg.core.errors import ConfigError

DATA_STAGES = ("vocabulary", "prompts", "generate", "label", "filter")
METRICS_ORDER = ("prompts", "label", "filter", "train", "eval")
MAX_CLASSES_LISTED = 100
MAX_METRIC_ROWS = 40

# Generated images inherit the generator's licence: hub licence id and a note, by model family.
_LICENCES = (
    (
        ("stable-diffusion-v1", "compvis/stable-diffusion"),
        "creativeml-openrail-m",
        "CreativeML OpenRAIL-M",
    ),
    (
        ("stable-diffusion-2", "stable-diffusion-xl", "sdxl"),
        "openrail++",
        "CreativeML OpenRAIL++-M",
    ),
)


@dataclass(frozen=True)
class RunInfo:
    """What the card says about the run that made the data.

    ``provenance``: backends and model ids (:func:`_provenance`); ``licence``: a hub licence
    id with ``licence_note``; ``params_sha256`` of ``params_file``; ``lock``: data output ->
    dvc.lock md5; ``lock_differs``: data stages whose dvc.lock params differ from the params
    file; ``metrics``: metrics file stem -> its JSON (or an error string); ``repo_id``: where
    it is pushed, if anywhere.
    """

    provenance: dict[str, Any]
    licence: str
    licence_note: str
    params_file: str
    params_sha256: str
    profile: str
    lock: dict[str, str] = field(default_factory=dict)
    lock_differs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None


def params_digest(params: Params) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the validated params."""
    text = json.dumps(params_to_dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _model_ref(ref: str | None) -> str | None:
    """A hub id as is; a local directory by its name only (no local paths on the hub)."""
    from magicseg.hub import looks_like_path

    if ref is None:
        return None
    return f"{Path(ref).name} (local directory)" if looks_like_path(ref) else ref


def _provenance(params: Params) -> dict[str, Any]:
    """Backends and model ids of the run. The one place that reads model keys of the params
    (their names may change: keep every such access here)."""
    g, lab, pr = params.generate, params.label, params.prompts
    out: dict[str, Any] = {"generator_backend": g.backend, "generator_model": None}
    if g.backend == "diffusers":
        out["generator_model"] = _model_ref(g.diffusers.checkpoint)
        out["generator"] = f"Stable Diffusion via diffusers: {out['generator_model']}"
        if g.diffusers.counterfactual_mode == "inpaint" and g.diffusers.inpaint_checkpoint:
            out["inpaint_model"] = _model_ref(g.diffusers.inpaint_checkpoint)
    else:
        out["generator"] = "magicseg procedural renderer (offline, no model)"
    out["labeler_backend"] = lab.backend
    if lab.backend == "grounded_sam":
        out["labeler_models"] = [
            _model_ref(lab.grounded_sam.detector_checkpoint),
            _model_ref(lab.grounded_sam.sam_checkpoint),
        ]
        out["labeler"] = "Grounding DINO {} + SAM {}".format(*out["labeler_models"])
    elif lab.backend == "oracle":
        out["labeler"] = "the procedural renderer's exact masks (oracle)"
    else:
        out["labeler"] = "magicseg counterfactual-difference labeler (model-free)"
    out["prompt_writer"] = pr.writer
    if pr.writer == "openai":
        where = f" at {pr.openai.base_url}" if pr.openai.base_url else ""
        out["llm"] = f"{pr.openai.llm} (OpenAI-compatible API{where})"
    elif pr.writer == "transformers":
        out["llm"] = _model_ref(pr.transformers.checkpoint)
    else:
        out["llm"] = None
    out["vocabulary"] = params.vocabulary.source
    return out


def _licence(prov: dict[str, Any]) -> tuple[str, str]:
    """(hub licence id, note): the images inherit the generator's licence."""
    if prov["generator_backend"] != "diffusers":
        return "apache-2.0", (
            "The images, counterfactuals and masks are made by magicseg's own procedural "
            "renderer and labeler, with no model: the project's licence (Apache-2.0) applies."
        )
    model = str(prov["generator_model"])
    for keys, hub_id, name in _LICENCES:
        if any(k in model.lower() for k in keys):
            return hub_id, (
                f"The images are generated by {model}: they come under its licence, the {name} "
                "licence, whose use restrictions pass on to this dataset and to models trained "
                "on it. The masks and metadata are magicseg's (Apache-2.0)."
            )
    return "other", (
        f"The images are generated by {model}: they come under that model's licence; read it "
        "before sharing or training on them. The masks and metadata are magicseg's (Apache-2.0)."
    )


def collect_run_info(
    params_file: str | Path,
    metrics_dir: str | Path | None = None,
    lock_file: str | Path | None = None,
    data_backends: dict[str, str] | None = None,
    repo_id: str | None = None,
) -> RunInfo:
    """Provenance, params digest, dvc.lock md5s and metrics of the run.

    ``params_file`` must validate (a one-line ConfigError otherwise). ``data_backends``
    (stage -> backend recorded in its manifest) must agree with the params, else the card
    would credit the wrong models: a one-line ConfigError. Missing metrics or lock files are
    fine: the card says so.
    """
    # 1. Params: provenance and digest.
    params_file = Path(params_file)
    params = load_params(params_file)
    prov = _provenance(params)
    for stage, used in (data_backends or {}).items():
        said = prov[f"{stage}_backend"] if f"{stage}_backend" in prov else None
        key = {"generator": "generate.backend", "labeler": "label.backend"}.get(stage, stage)
        if said is not None and used != said:
            raise ConfigError(
                f"{params_file}: {key} is {said!r} but the data was made by {used!r}: run "
                "dvc repro, or give the params the data was made with (--params)"
            )
    licence, note = _licence(prov)

    # 2. dvc.lock: md5s of the data outputs, and whether the lock's params are these.
    lock, differs = {}, []
    if lock_file is not None and Path(lock_file).is_file():
        raw = yaml.safe_load(params_file.read_text()) or {}
        stages = (yaml.safe_load(Path(lock_file).read_text()) or {}).get("stages", {})
        for name in DATA_STAGES:
            stage = stages.get(name) or {}
            for out in stage.get("outs", []):
                if str(out.get("path", "")).startswith("data/"):
                    lock[out["path"]] = str(out.get("md5", "?"))
            recorded = (stage.get("params") or {}).get(params_file.name, {})
            if any(raw.get(k) != v for k, v in recorded.items()):
                differs.append(name)

    # 3. Metrics, whatever they hold.
    metrics: dict[str, Any] = {}
    if metrics_dir is not None and Path(metrics_dir).is_dir():
        for path in sorted(Path(metrics_dir).glob("*.json")):
            try:
                metrics[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                metrics[path.stem] = f"unreadable ({type(err).__name__})"
    return RunInfo(
        prov,
        licence,
        note,
        str(params_file),
        params_digest(params),
        params.profile,
        lock,
        differs,
        metrics,
        repo_id,
    )


def data_backends(generate_dir: str | Path, label_dir: str | Path) -> dict[str, str]:
    """The backends recorded in the generate and label (or filter) manifests, where one is."""
    out = {}
    for stage, directory in (("generator", generate_dir), ("labeler", label_dir)):
        path = Path(directory) / "manifest.parquet"
        try:
            col = pd.read_parquet(path, columns=["backend"])["backend"].dropna()
        except Exception:  # noqa: BLE001 - no column or no file: nothing to check
            continue
        if len(col) and col.iloc[0]:
            out[stage] = str(col.iloc[0])
    return out


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def size_category(n: int) -> str:
    for limit, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M" if n < 10**6 else "1M<n<10M"


def render_card(summary, vocab, feats, run: RunInfo | None) -> str:
    """The card's text: YAML front matter for the hub, then a Markdown body.

    ``summary`` is the :class:`magicseg.export.hf.HFExport`, ``feats`` the export's
    ``datasets.Features``, ``run`` the :class:`RunInfo` (None: no provenance section)."""
    prov = run.provenance if run else {}
    title = f"magicseg synthetic segmentation: {vocab.source}, {len(vocab)} classes"
    meta: dict[str, Any] = {
        "pretty_name": title,
        "license": run.licence if run else "other",
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "size_categories": [size_category(summary.rows)],
        "tags": ["synthetic", "magicseg", "counterfactual", "open-vocabulary", "segmentation"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/train-*"}],
            }
        ],
    }
    if hasattr(feats, "_to_yaml_list"):
        meta["dataset_info"] = {
            "features": feats._to_yaml_list(),
            "splits": [
                {"name": "train", "num_bytes": summary.arrow_bytes, "num_examples": summary.rows}
            ],
            "download_size": summary.bytes,
            "dataset_size": summary.arrow_bytes,
        }
    if run:
        meta["magicseg"] = {
            "generator": prov.get("generator_model") or prov["generator"],
            "labeler": prov.get("labeler_models") or prov["labeler"],
            "llm": prov.get("llm"),
            "vocabulary": f"{vocab.source} ({len(vocab)} classes)",
            "params_sha256": run.params_sha256,
            "profile": run.profile,
        }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    parts = [f"---\n{front}---\n", f"# {title}\n", _intro(summary, vocab, prov)]
    parts.append(_contents(summary, vocab, "kept" in feats))
    if run:
        parts.append(_made(run))
    parts.append(_classes(vocab))
    if run:
        parts.append(_figures(run))
    parts.append(_loading(run.repo_id if run else None, summary))
    parts.append(_licence_section(run))
    return "\n".join(parts)


def _intro(summary, vocab, prov) -> str:
    kept = f"{summary.rows} samples" + (
        f" ({summary.kept} kept by the filter, {summary.rows - summary.kept} dropped, "
        "flagged by `kept`)"
        if summary.rows != summary.kept
        else " kept by the filter"
    )
    return (
        "A synthetic semantic-segmentation dataset made by magicseg (a re-implementation of "
        "*MagicSeg*: open-world "
        "segmentation pretraining from counterfactual diffusion synthesis). Each sample is a "
        "positive image of one or two classes, its **counterfactual** twin made from the same "
        "seed with the objects removed, and a class-index mask labelled from the pair.\n\n"
        f"This export holds {kept}, over a vocabulary of {len(vocab)} classes "
        f"({vocab.source}).\n"
    )


def _contents(summary, vocab, with_kept: bool) -> str:
    from magicseg.core.io import ignore_index, mask_dtype

    dtype, ignore = mask_dtype(len(vocab)), ignore_index(len(vocab))
    rows = [
        ("id", "string", "sample id (the same in every stage's manifest)"),
        ("image", "Image (PNG or JPEG, RGB)", "the positive image"),
        ("counterfactual_image", "Image (PNG or JPEG, RGB)", "same seed, the object(s) removed"),
        (
            "mask",
            f"Image (PNG, {dtype})",
            f"class indices: `k` = `classes` label `k - 1`; 0 = background; {ignore} = ignore",
        ),
        ("classes", "list of ClassLabel", "the classes the sample was made for"),
        ("prompt", "string", "text prompt of the positive"),
        ("counterfactual_prompt", "string", "text prompt of the counterfactual"),
        ("seed", "int64", "generation seed shared by the pair"),
        ("scores", "list of float64 or null", "labeler confidence per class"),
        ("boxes", "list of [x0, y0, x1, y1] or null", "detections behind the mask (pixels)"),
        ("box_classes", "list of ClassLabel or null", "class of each box"),
        ("box_scores", "list of float64 or null", "score of each box"),
        ("cf_detected", "list of bool or null", "class still found in the counterfactual"),
        ("cf_agreement", "float64 or null", "IoU of the mask with the counterfactual difference"),
        ("reasons", "list of string", "the filter's reasons to drop (empty when kept)"),
    ]
    if with_kept:
        rows.append(("kept", "bool", "kept by the filter"))
    table = "\n".join(f"| `{n}` | {t} | {d} |" for n, t, d in rows)
    size = _bytes(summary.bytes)
    return (
        "## Contents\n\n"
        f"One split, `train`: {summary.rows} rows in {summary.shards} Parquet shard(s) "
        f"under `data/` ({size}). Null columns are ones the labeler does not produce.\n\n"
        "| column | type | meaning |\n|---|---|---|\n" + table + "\n\n"
        "Masks are stored byte for byte as the pipeline wrote them (lossless PNG, never "
        "re-encoded).\n"
    )


def _made(run: RunInfo) -> str:
    prov = run.provenance
    lines = [
        "## How it was made\n",
        f"- generator: {prov['generator']}",
    ]
    if prov.get("inpaint_model"):
        lines.append(f"- counterfactual inpainting: {prov['inpaint_model']}")
    lines += [
        f"- labeler: {prov['labeler']}",
        f"- prompts: {prov['prompt_writer']} writer"
        + (f", LLM {prov['llm']}" if prov.get("llm") else " (no LLM)"),
        f"- profile: `{run.profile}`; params `{Path(run.params_file).name}` sha256 "
        f"`{run.params_sha256}` (canonical JSON of the composed params)",
    ]
    if run.lock:
        lines.append(
            "- data outputs in `dvc.lock`: "
            + ", ".join(f"`{k}` md5 `{v}`" for k, v in run.lock.items())
        )
    else:
        lines.append("- no `dvc.lock` was found: the data outputs' hashes are not recorded")
    if run.lock_differs:
        lines.append(
            "- **note**: `dvc.lock` records other params than the params file for "
            + ", ".join(run.lock_differs)
            + "; the data may not come from the params above"
        )
    return "\n".join(lines) + "\n"


def _classes(vocab) -> str:
    shown = vocab.names[:MAX_CLASSES_LISTED] if len(vocab) > MAX_CLASSES_LISTED else vocab.names
    items = [f"`{i}` {name}{' *' if i in vocab.holdout else ''}" for i, name in enumerate(shown, 1)]
    more = (
        f", … and {len(vocab) - len(shown)} more (all in `features['classes'].feature.names`)"
        if len(shown) < len(vocab)
        else ""
    )
    held = (
        f"\n\n`*`: held out of the data ({len(vocab.holdout)} classes never prompted), for "
        "open-vocabulary evaluation."
        if vocab.holdout
        else ""
    )
    return (
        f"## Classes\n\n{len(vocab)} classes; mask value `k` is class `k`:\n\n"
        + " · ".join(items)
        + more
        + held
        + "\n"
    )


def _figures(run: RunInfo) -> str:
    if not run.metrics:
        return "## Figures of the run\n\nNo `metrics/*.json` were found for this run.\n"
    names = [n for n in METRICS_ORDER if n in run.metrics]
    names += sorted(n for n in run.metrics if n not in METRICS_ORDER)
    parts = ["## Figures of the run\n", "The pipeline's own metrics (`metrics/*.json`).\n"]
    for name in names:
        data = run.metrics[name]
        parts.append(f"### {name}\n")
        if not isinstance(data, dict):
            parts.append(f"`metrics/{name}.json`: {_value(data)}\n")
            continue
        rows = list(_flatten(data))
        body = [f"| `{k}` | {_value(v)} |" for k, v in rows[:MAX_METRIC_ROWS]]
        if len(rows) > MAX_METRIC_ROWS:
            body.append(f"| … | {len(rows) - MAX_METRIC_ROWS} more in `metrics/{name}.json` |")
        parts.append("| metric | value |\n|---|---|\n" + "\n".join(body) + "\n")
    return "\n".join(parts)


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _value(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, list):
        if len(v) <= 8 and all(isinstance(x, (int, float, str, bool)) or x is None for x in v):
            return ", ".join(_value(x) for x in v) or "(empty)"
        return f"list of {len(v)}"
    if isinstance(v, dict):
        return "(empty)"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _loading(repo_id: str | None, summary) -> str:
    where = repo_id or "path/to/this/directory"
    local = (
        "" if repo_id else f'ds = load_from_disk("{where}")["train"]  # the same rows, as Arrow\n'
    )
    return (
        "## Load it\n\n```python\nimport numpy as np\n"
        "from datasets import load_dataset, load_from_disk\n\n"
        f'ds = load_dataset("{where}", split="train")  # the Parquet shards\n'
        + local
        + 'mask = np.array(ds[0]["mask"])  # HxW class indices\n'
        'names = ds.features["classes"].feature.names  # mask value k -> names[k - 1]\n\n'
        f'stream = load_dataset("{where}", split="train", streaming=True)  # no full download\n'
        "first = next(iter(stream))\n```\n"
    )


def _licence_section(run: RunInfo | None) -> str:
    note = run.licence_note if run else "Unknown provenance: check the generator's licence."
    return f"## Licence\n\n{note}\n"
