"""Hugging Face export: round trips through ``datasets`` in a fresh process, byte-identical
masks (uint8 and uint16), dropped samples, the card, resumed exports, push refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tests.helpers import make_dataset
from typer.testing import CliRunner

from magicseg.cli import app
from magicseg.core.config import FilterParams, Params, params_to_dict, parse_params
from magicseg.core.errors import ConfigError
from magicseg.core.io import (
    read_manifest,
    read_mask,
    write_image,
    write_json,
    write_manifest,
    write_mask,
)
from magicseg.core.stage import load_vocabulary
from magicseg.core.vocabulary import Vocabulary
from magicseg.export import hf
from magicseg.export.card import _licence, _provenance, collect_run_info, params_digest
from magicseg.export.push import push_export
from magicseg.filter import run_filter

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "40KB"  # about three 64 px samples per shard

LOAD = r"""
import glob, hashlib, json, sys
import numpy as np
from datasets import Image, load_dataset, load_from_disk

out = sys.argv[1]

def rows(ds):
    raw = ds
    for col in ("image", "counterfactual_image", "mask"):
        raw = raw.cast_column(col, Image(decode=False))
    got = []
    for r in raw:
        got.append({
            k: hashlib.sha256(v["bytes"]).hexdigest() if isinstance(v, dict) else v
            for k, v in r.items()
        })
    first = np.array(ds[0]["mask"])
    return {"rows": got, "names": ds.features["classes"].feature.names,
            "box_names": ds.features["box_classes"].feature.names,
            "mask0": [str(first.dtype), first.tolist()]}

files = sorted(glob.glob(out + "/data/*.parquet"))
print(json.dumps({
    "disk": rows(load_from_disk(out)["train"]),
    "parquet": rows(load_dataset("parquet", data_files=files, split="train")),
    "folder": rows(load_dataset(out, split="train")),
}))
"""


def _env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    e.update(extra)
    return e


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _run_dir(root: Path) -> Path:
    """An offline run in miniature: stage outputs, params.yaml, metrics/ and a dvc.lock."""
    make_dataset(root, requests=8, per_request=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params_to_dict(Params())))
    run_filter(root / "label", root / "filter", FilterParams(), root / "metrics/filter.json")
    write_json(root / "metrics/train.json", {"loss": 0.25, "curve": [1, 2], "nested": {"a": None}})
    (root / "metrics/broken.json").write_text("{not json")
    lock = {
        "schema": "2.0",
        "stages": {
            "filter": {
                "params": {"params.yaml": {"seed": 0, "filter": params_to_dict(FilterParams())}},
                "outs": [{"path": "data/filter", "md5": "0123abcd.dir"}],
            },
            "label": {
                "params": {"params.yaml": {"label": {"backend": "oracle"}}},
                "outs": [{"path": "data/label", "md5": "4567ef.dir"}],
            },
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "export",
        "--format",
        "hf",
        "--out",
        str(out),
        "--filtered",
        str(root / "filter"),
        "--vocab",
        str(root / "vocabulary"),
        "--generated",
        str(root / "generate"),
        "--labels",
        str(root / "label"),
        "--params",
        str(root / "params.yaml"),
        "--metrics",
        str(root / "metrics"),
        "--lock",
        str(root / "dvc.lock"),
        "--shard-size",
        BUDGET,
        *extra,
    ]


def _export(root: Path, out: Path, *extra: str):
    res = CliRunner().invoke(app, _args(root, out, *extra))
    assert res.exit_code == 0, res.output
    return res


def _one_error_line(output: str, culprit: str) -> None:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], output


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = _run_dir(tmp_path_factory.mktemp("run"))
    decisions = read_manifest(root / "filter", "decisions.parquet")
    assert 0 < decisions["kept"].sum() < len(decisions)  # the filter dropped some, kept some
    return root


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "hf"
    _export(run, out)
    return out


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------
def test_round_trip_in_a_fresh_process_matches_the_manifests(run, exported, tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", LOAD, str(exported)],
        env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])

    kept = read_manifest(run / "filter")
    gen = read_manifest(run / "generate").set_index("id")
    vocab = load_vocabulary(run / "vocabulary")
    for how in ("disk", "parquet", "folder"):
        got = loaded[how]
        assert got["names"] == list(vocab.names) == got["box_names"]
        assert [r["id"] for r in got["rows"]] == kept["id"].tolist(), how
        for r, row in zip(got["rows"], kept.itertuples(index=False), strict=True):
            assert r["mask"] == _sha(run / "filter" / row.mask)  # byte-identical PNGs
            assert r["image"] == _sha(run / "filter" / row.image)
            assert r["counterfactual_image"] == _sha(run / "filter" / row.cf_image)
            assert r["classes"] == [int(c) - 1 for c in row.class_ids]
            assert r["prompt"] == row.prompt
            assert r["counterfactual_prompt"] == gen.loc[row.id, "cf_prompt"]
            assert r["seed"] == int(gen.loc[row.id, "seed"])
            assert r["cf_agreement"] == (None if np.isnan(row.cf_agreement) else row.cf_agreement)
            assert r["reasons"] == [] and "kept" not in r
            # the default labeler (grounded_proxy) detects: its boxes and scores round-trip
            assert r["boxes"] == [[float(v) for v in b] for b in row.boxes]
            assert r["box_scores"] == [float(v) for v in row.box_scores]
            assert r["scores"] == [float(v) for v in row.scores]
        first = read_mask(run / "filter" / kept["mask"].iloc[0])
        assert got["mask0"][0] == "uint8"
        np.testing.assert_array_equal(np.array(got["mask0"][1]), first)


def test_shards_follow_the_size_budget_and_the_ledger(run, exported):
    record = json.loads((exported / "export.json").read_text())
    files = sorted((exported / "data").glob("*.parquet"))
    n = len(files)
    assert n >= 3 and [f.name for f in files] == [
        f"train-{k:05d}-of-{n:05d}.parquet" for k in range(n)
    ]
    ids = [i for s in record["shards"] for i in s["ids"]]
    assert ids == read_manifest(run / "filter")["id"].tolist()
    import pyarrow.parquet as pq

    budget = hf.parse_size(BUDGET)
    for f, shard in zip(files, record["shards"], strict=True):
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows == shard["rows"] == len(shard["ids"])
        assert f.stat().st_size == shard["bytes"]
        if shard["rows"] > 1:  # only a sample bigger than the budget gets a bigger shard
            assert f.stat().st_size < budget + 20_000  # + Parquet footer and schema
    assert not (exported.parent / f".{exported.name}.partial").exists()


def test_include_dropped_adds_the_dropped_rows_with_their_reasons(run, tmp_path):
    out = tmp_path / "all"
    _export(run, out, "--include-dropped")
    ds = datasets.load_from_disk(str(out))["train"]
    decisions = read_manifest(run / "filter", "decisions.parquet")
    label = read_manifest(run / "label")
    assert ds["id"] == decisions["id"].tolist() == label["id"].tolist()
    assert ds["kept"] == decisions["kept"].tolist()
    assert ds["reasons"] == [list(r) for r in decisions["reasons"]]
    assert all(r for r, k in zip(ds["reasons"], ds["kept"], strict=True) if not k)
    raw = ds.cast_column("mask", datasets.Image(decode=False))
    for got, rel in zip(raw["mask"], label["mask"], strict=True):
        assert got["bytes"] == (run / "label" / rel).read_bytes()


def test_uint16_vocabulary_round_trips_masks_and_detections(tmp_path):
    """A 300-class vocabulary (uint16 masks, ignore 65535) and a detecting labeler's columns."""
    names = tuple(f"thing {i}" for i in range(1, 301))
    write_manifest(tmp_path / "vocabulary", Vocabulary(names).to_frame())
    lab, gen_rows, rows = tmp_path / "label", [], []
    specs = [  # class ids, box scores: an empty list means nothing detected (dropped)
        ((257, 300), [0.9, 0.8]),
        ((1,), [0.7]),
        ((299,), []),
    ]
    masks = []
    for i, (ids, box_scores) in enumerate(specs):
        m = np.zeros((40, 48), np.int64)
        for j, c in enumerate(ids):
            m[4 + 16 * j : 14 + 16 * j, 5:30] = c
        if box_scores:
            m[0, :3] = 65535  # ignore
        masks.append(m)
        write_image(lab / f"img/{i}.png", np.full((40, 48, 3), 30 * i, np.uint8))
        write_image(lab / f"cf/{i}.png", np.full((40, 48, 3), 200, np.uint8))
        write_mask(lab / f"masks/{i}.png", m, len(names))
        boxes = [[5.0, 4.0 + 16 * j, 30.0, 14.0 + 16 * j] for j in range(len(box_scores))]
        rows.append(
            {
                "id": f"s{i}",
                "prompt": "a photo of " + " and ".join(names[c - 1] for c in ids),
                "class_ids": list(ids),
                "class_names": [names[c - 1] for c in ids],
                "image": f"img/{i}.png",
                "cf_image": f"cf/{i}.png",
                "mask": f"masks/{i}.png",
                "areas": [float((m == c).mean()) for c in ids],
                "components": [1] * len(ids),
                "ignore_frac": float((m == 65535).mean()),
                "scores": box_scores[: len(ids)] or [0.0] * len(ids),
                "cf_detected": [False] * len(ids),
                "cf_agreement": 0.5 + 0.1 * i,
                "oracle_iou": float("nan"),
                "boxes": boxes,
                "box_classes": list(ids)[: len(box_scores)],
                "box_scores": box_scores,
            }
        )
        gen_rows.append({"id": f"s{i}", "cf_prompt": "a photo of nothing", "seed": 10**18 + i})
    write_manifest(lab, pd.DataFrame(rows))
    write_manifest(tmp_path / "generate", pd.DataFrame(gen_rows))
    run_filter(lab, tmp_path / "filter", FilterParams(min_area=0.01, max_ignore=0.1))

    res = hf.export_hf(
        tmp_path / "filter",
        tmp_path / "vocabulary",
        tmp_path / "generate",
        tmp_path / "out",
        label_dir=lab,
        include_dropped=True,
        card=None,
        progress=False,
    )
    assert (res.rows, res.kept, res.written) == (3, 2, res.shards)
    ds = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert ds.features["classes"].feature.names == list(names)
    assert ds["kept"] == [True, True, False] and ds["reasons"][2] == ["no_detection"]
    for i, row in enumerate(ds):
        got = np.array(row["mask"])
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, masks[i])
        assert row["classes"] == [c - 1 for c in specs[i][0]]
        assert row["seed"] == 10**18 + i
        assert row["box_scores"] == specs[i][1]
        assert row["box_classes"] == [c - 1 for c in specs[i][0][: len(specs[i][1])]]
        assert row["boxes"] == rows[i]["boxes"]
        assert row["cf_agreement"] == pytest.approx(0.5 + 0.1 * i)
    raw = datasets.load_dataset(
        "parquet",
        data_files=sorted(str(p) for p in (tmp_path / "out/data").glob("*.parquet")),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    ).cast_column("mask", datasets.Image(decode=False))
    assert [m["bytes"] for m in raw["mask"]] == [
        (lab / f"masks/{i}.png").read_bytes() for i in range(3)
    ]
    card = (tmp_path / "out/README.md").read_text()
    assert "65535 = ignore" in card and "uint16" in card


# --------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------
def test_card_has_hub_metadata_provenance_and_the_run_figures(run, exported):
    text = (exported / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["task_categories"] == ["image-segmentation"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["license"] == "apache-2.0"
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    names = meta["dataset_info"]["features"][4]["list"]["class_label"]["names"]
    vocab = load_vocabulary(run / "vocabulary")
    assert list(names.values()) == list(vocab.names)
    assert meta["magicseg"]["params_sha256"] == params_digest(Params())
    assert meta["magicseg"]["generator"].startswith("magicseg procedural renderer")
    kept = read_manifest(run / "filter")
    assert meta["dataset_info"]["splits"][0]["num_examples"] == len(kept)
    body = text.split("---\n", 2)[2]
    figures = json.loads((run / "metrics/filter.json").read_text())
    assert f"| `kept_ratio` | {figures['kept_ratio']:.6g} |" in body
    assert f"| `dropped.missing_class` | {figures['dropped']['missing_class']} |" in body
    assert "| `loss` | 0.25 |" in body and "| `curve` | 1, 2 |" in body
    assert "| `nested.a` | – |" in body and "unreadable (JSONDecodeError)" in body
    assert "`data/filter` md5 `0123abcd.dir`" in body
    # dvc.lock's label params are not params.yaml's: the card says so
    assert "records other params than the params file for label" in body
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(exported / "README.md").data.task_categories == ["image-segmentation"]


def test_generator_licence_and_params_that_disagree_with_the_data(run):
    sd = parse_params({"generate": {"backend": "diffusers"}, "label": {"backend": "grounded_sam"}})
    prov = _provenance(sd)
    assert prov["generator_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert prov["labeler_models"] == ["IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-huge"]
    assert _licence(prov)[0] == "creativeml-openrail-m"
    other = parse_params({"generate": {"backend": "diffusers", "diffusers": {"checkpoint": "x/y"}}})
    assert _licence(_provenance(other))[0] == "other"
    with pytest.raises(ConfigError, match="generate.backend is 'diffusers' but the data was made"):
        (run / "sd.yaml").write_text(yaml.safe_dump(params_to_dict(sd)))
        collect_run_info(run / "sd.yaml", data_backends={"generator": "procedural"})


# --------------------------------------------------------------------------------------------
# resumable, atomic, up to date
# --------------------------------------------------------------------------------------------
def test_a_killed_export_resumes_to_the_same_bytes(run, exported, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    shards = json.loads((exported / "export.json").read_text())["shards"]
    calls = {"n": 0}
    read = hf._read_bytes

    def dies_in_the_third_shard(path):
        calls["n"] += 1
        if calls["n"] > 3 * (shards[0]["rows"] + shards[1]["rows"]) + 1:  # 3 files a sample
            raise KeyboardInterrupt
        return read(path)

    with monkeypatch.context() as m:
        m.setattr(hf, "_read_bytes", dies_in_the_third_shard)
        res = CliRunner().invoke(app, _args(run, out))  # as Ctrl-C: exit 130
    assert res.exit_code == 130, res.output
    partial = tmp_path / ".hf.partial"
    assert not out.exists() and partial.is_dir()
    done = json.loads((partial / "ledger.json").read_text())["shards"]
    assert len(done) == 2  # two shards finished before the kill, none half-written
    assert not list((partial / "shards").glob(".*.tmp"))
    inodes = {p.name: p.stat().st_ino for p in (partial / "shards").glob("*.parquet")}
    # what a SIGKILL mid-write leaves: a temporary file, removed by the resume
    (partial / "shards/.0123.parquet.abc.tmp").write_bytes(b"half a shard")

    res = _export(run, out)
    total = len(list((exported / "data").glob("*.parquet")))
    assert f"{total - 2} shard(s) written, 2 reused" in res.output
    assert _tree(out) == _tree(exported)  # byte for byte, card and Arrow copy included
    for name, ino in inodes.items():  # the finished shards were kept, not rewritten
        digest = name.removesuffix(".parquet")
        record = json.loads((out / "export.json").read_text())
        (file,) = [s["file"] for s in record["shards"] if s["digest"] == digest]
        assert (out / file).stat().st_ino == ino
    assert not partial.exists()


def test_rerun_is_up_to_date_and_a_changed_mask_rewrites_only_its_shard(run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(run, root)
    out = tmp_path / "hf"
    _export(root, out)
    before = _tree(out)
    assert "up to date, card refreshed" in _export(root, out).output
    assert _tree(out) == before

    record = json.loads((out / "export.json").read_text())
    victim = record["shards"][1]["ids"][0]
    kept = read_manifest(root / "filter").set_index("id")
    mask_path = root / "filter" / kept.loc[victim, "mask"]
    mask = read_mask(mask_path)
    mask[0, 0] = 0 if mask[0, 0] else 1
    write_mask(mask_path, mask, 48)
    res = _export(root, out)
    assert "1 shard(s) written" in res.output
    after = _tree(out)
    changed = {k for k in before if k.startswith("data/") and before[k] != after.get(k)}
    assert changed == {record["shards"][1]["file"]}
    ds = datasets.load_from_disk(str(out))["train"].cast_column(
        "mask", datasets.Image(decode=False)
    )
    i = ds["id"].index(victim)
    assert ds[i]["mask"]["bytes"] == mask_path.read_bytes()


# --------------------------------------------------------------------------------------------
# refusals: one line, exit 2, before any work
# --------------------------------------------------------------------------------------------
def test_an_empty_kept_set_is_a_one_line_error(run, tmp_path):
    root = tmp_path / "run"
    for d in ("vocabulary", "generate", "label", "metrics"):
        shutil.copytree(run / d, root / d)
    shutil.copy(run / "params.yaml", root / "params.yaml")
    shutil.copy(run / "dvc.lock", root / "dvc.lock")
    run_filter(root / "label", root / "filter", FilterParams(min_area=0.95, max_area=1.0))
    res = CliRunner().invoke(app, _args(root, tmp_path / "out"))
    assert res.exit_code == 2
    _one_error_line(res.output, "no kept samples to export")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_options_that_do_not_apply_and_a_foreign_out_dir_are_refused(run, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--format", "coco", "--push-to-hub", "org/name"])
    assert res.exit_code == 2
    _one_error_line(res.output, "--push-to-hub: applies to --format hf only")
    res = runner.invoke(app, ["export", "--format", "parquet"])
    _one_error_line(res.output, "unknown format 'parquet' (available: coco, hf)")
    res = runner.invoke(app, _args(run, tmp_path / "x", "--private"))
    _one_error_line(res.output, "--private: applies to --push-to-hub only")
    res = runner.invoke(app, [*_args(run, tmp_path / "x"), "--shard-size", "lots"])
    _one_error_line(res.output, "--shard-size: 'lots' is not a size")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    res = runner.invoke(app, _args(run, tmp_path / "mine"))
    assert res.exit_code == 2
    _one_error_line(res.output, "exists and is not a magicseg hf export")
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "env, culprit",
    [
        ({}, "--push-to-hub: no Hugging Face token (set HF_TOKEN or run huggingface-cli login)"),
        ({"HF_TOKEN": "hf_dummy", "HF_ENDPOINT": "closed"}, "cannot reach the Hugging Face hub"),
        ({"HF_TOKEN": "hf_dummy", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set (offline mode)"),
    ],
    ids=["no_token", "hub_unreachable", "offline_mode"],
)
def test_push_is_refused_in_one_line_before_any_work(run, tmp_path, env, culprit):
    if env.get("HF_ENDPOINT") == "closed":
        env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "magicseg.cli", *_args(run, out, "--push-to-hub", "org/name")],
        env=_env(HF_HOME=str(tmp_path / "hf-home"), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    _one_error_line(res.stderr, culprit)
    assert "Traceback" not in res.stderr and not out.exists()
    assert not (tmp_path / ".out.partial").exists()


class _FakeHub:
    def __init__(self, public: bool = False):
        self.calls, self.public = [], public

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def repo_info(self, repo_id, **kw):
        return type("Info", (), {"private": not self.public})()

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Commit", (), {"commit_url": "https://hub/commit/1"})()


def test_push_uploads_the_card_and_shards_in_one_commit(exported):
    hub = _FakeHub()
    assert push_export(exported, "org/name", True, "tok", api=hub) == "https://hub/commit/1"
    (_, repo, kw), (_, up) = hub.calls
    assert repo == "org/name" and kw == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert up["folder_path"] == str(exported) and up["repo_type"] == "dataset"
    assert up["allow_patterns"] == ["README.md", "data/*.parquet"]
    assert up["delete_patterns"] == ["data/*.parquet"]  # no stale shards of an older export
    public = _FakeHub(public=True)
    with pytest.raises(Exception, match="already exists and is public"):
        push_export(exported, "org/name", True, "tok", api=public)
    assert [c[0] for c in public.calls] == ["create_repo"]  # nothing uploaded
