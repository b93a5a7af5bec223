"""The bad-input catalogue (docs/bad_inputs.md): each bad input gives one line naming the
culprit, a non-zero exit, and loses nothing already done.

``FATAL`` cases run through the stage entrypoints' ``user_errors`` wrapper (in-process; a few
also as real subprocesses): exit code 2, exactly one ``error:`` line on stderr, no traceback.
``HANDLED`` cases are per-sample problems in a long run (a corrupt image among a million, an
out-of-memory batch): the run goes on, the sample is recorded or the batch retried.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import stages.generate as generate_stage
import stages.label as label_stage
import stages.vocabulary as vocabulary_stage
import yaml
from tests.scaleout_helpers import ROOT, digest, make_inputs, run_stage

from magicseg.batching import batched_with_oom_retry
from magicseg.core import io as mio
from magicseg.core.catalogue import CATALOGUE
from magicseg.core.config import (
    FilterParams,
    GenerateParams,
    LabelParams,
    ProceduralGeneratorParams,
)
from magicseg.core.io import read_manifest
from magicseg.core.stage import user_errors
from magicseg.filter import reasons_for
from magicseg.generate import run_generate
from magicseg.generate.procedural import ProceduralGenerator
from magicseg.label import LABELERS, run_label
from magicseg.label.base import LabelResult
from magicseg.samplecache import SampleCache, iter_keys

N = len(CATALOGUE)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """vocabulary, prompts, params.yaml and generate (12 pairs), made once."""
    root = tmp_path_factory.mktemp("base")
    p = make_inputs(root, requests=6)
    run_generate(root / "prompts", root / "generate", p.generate, N)
    return root


def _copy(base: Path, tmp: Path, *names: str) -> Path:
    for name in names:
        src = base / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tmp / name)
    return tmp


def _params(tmp: Path, section: str, update: dict) -> Path:
    data = yaml.safe_load((tmp / "params.yaml").read_text())
    data[section].update(update)
    (tmp / "params.yaml").write_text(yaml.safe_dump(data))
    return tmp / "params.yaml"


def _gen(tmp: Path, **kw) -> Callable[[], object]:
    def go():
        return generate_stage.main(
            vocab=tmp / "vocabulary",
            prompts=tmp / "prompts",
            out=tmp / "out",
            cache=tmp / "cache",
            params_file=tmp / "params.yaml",
            **kw,
        )

    return go


def _lab(tmp: Path, gen: str = "generate") -> Callable[[], object]:
    def go():
        return label_stage.main(
            vocab=tmp / "vocabulary",
            generated=tmp / gen,
            out=tmp / "label",
            metrics=tmp / "label.json",
            cache=tmp / "lcache",
            params_file=tmp / "params.yaml",
        )

    return go


def _vocab_file(tmp: Path, text: str) -> Callable[[], object]:
    (tmp / "classes.txt").write_text(text)
    _params(
        tmp,
        "vocabulary",
        {"source": "file", "file": str(tmp / "classes.txt"), "holdout_combination": 0},
    )
    return lambda: vocabulary_stage.main(out=tmp / "vocab_out", params_file=tmp / "params.yaml")


def _edit_prompts(tmp: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Hand-edit the prompts manifest (plain parquet: write_manifest refuses duplicate ids)."""
    frame = edit(read_manifest(tmp / "prompts"))
    frame.to_parquet(tmp / "prompts" / "manifest.parquet", index=False)


# --------------------------------------------------------------------------------------------
# fatal cases: (setup(tmp) -> action, expected culprit text in the one error line)
# --------------------------------------------------------------------------------------------
def params_unknown_key(t):
    _params(t, "generate", {"batchsize": 8})
    return _gen(t)


def params_renamed_key(t):
    _params(t, "train", {"model": "clip"})
    return _gen(t)


def params_wrong_type(t):
    _params(t, "generate", {"height": "big"})
    return _gen(t)


def params_out_of_range(t):
    _params(t, "label", {"difference": {"threshold": 1.5}})
    return _lab(t)


def params_not_yaml(t):
    (t / "params.yaml").write_text("generate: [unclosed\n")
    return _gen(t)


def vocabulary_empty(t):
    return _vocab_file(t, "\n  \n")


def vocabulary_duplicate(t):
    return _vocab_file(t, "owl\nschool bus\nOwl\n")


def vocabulary_odd_characters(t):
    return _vocab_file(t, "owl\nschool\tbus 💥\n")


def vocabulary_file_missing(t):
    _params(t, "vocabulary", {"source": "file", "file": str(t / "nope.txt")})
    return lambda: vocabulary_stage.main(out=t / "v", params_file=t / "params.yaml")


def vocabulary_holdout_too_many(t):
    _params(t, "vocabulary", {"source": "voc", "holdout_combination": 3, "holdout_novel_words": 0})
    return lambda: vocabulary_stage.main(out=t / "v", params_file=t / "params.yaml")


def prompt_without_its_class(t):
    def edit(f):
        f.loc[2, "prompt"] = "An empty beach at dawn"
        return f

    _edit_prompts(t, edit)
    return _gen(t)


def prompt_class_outside_vocabulary(t):
    def edit(f):
        i = next(i for i, ids in enumerate(f["class_ids"]) if len(ids) == 1)
        f.at[i, "class_ids"] = [999]
        return f

    _edit_prompts(t, edit)
    return _gen(t)


def prompt_duplicate_id(t):
    def edit_dup(f):
        f.loc[3, "id"] = f.loc[2, "id"]
        return f

    _edit_prompts(t, edit_dup)
    return _gen(t)


def input_manifest_missing(t):
    (t / "empty").mkdir()
    return _lab(t, gen="empty")


def every_image_unreadable(t):
    for f in (t / "generate" / "images").glob("*.png"):
        f.write_bytes(b"not a png")
    return _lab(t)


def labeler_mask_wrong_size(t):
    class Bad:
        name = "bad_size"

        def label(self, batch, ignore):
            return [LabelResult(mask=np.zeros((8, 8), np.int64)) for _ in batch]

    return lambda: run_label(t / "generate", t / "label", LabelParams(), N, labeler=Bad())


def out_of_memory_at_batch_of_one(t):
    def always_oom(batch):
        raise MemoryError

    recs = [type("R", (), {"id": f"s{i}"})() for i in range(4)]
    return lambda: list(batched_with_oom_retry(recs, 4, always_oom, what="generate (test)"))


def disk_full_generate(t, monkeypatch=None):
    _fill_disk_after(monkeypatch, 10)
    return _gen(t)


def disk_full_label(t, monkeypatch=None):
    _fill_disk_after(monkeypatch, 5)
    return _lab(t)


def bad_launch(t, monkeypatch=None):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    return _gen(t)


def unknown_backend(t):
    return lambda: LABELERS.build("grounded_samm", LabelParams())


def _fill_disk_after(monkeypatch, n: int) -> None:
    """After ``n`` PNG writes, every write fails with ENOSPC (as a full disk does)."""
    real = mio.Image.Image.save
    count = [0]

    def save(self, fp, *a, **kw):
        count[0] += 1
        if count[0] > n:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real(self, fp, *a, **kw)

    monkeypatch.setattr(mio.Image.Image, "save", save)


FATAL = [
    (params_unknown_key, "generate.batchsize: unknown key (allowed: backend, batch_size"),
    (params_renamed_key, "params.yaml: train.model: renamed to train.architecture"),
    (params_wrong_type, "generate.height: Input should be a valid integer"),
    (params_out_of_range, "label.difference.threshold: Input should be less than 1"),
    (params_not_yaml, "params.yaml: not valid YAML"),
    (vocabulary_empty, "classes.txt: the vocabulary is empty"),
    (vocabulary_duplicate, "line 3: duplicate class name 'owl' (first on line 1)"),
    (vocabulary_odd_characters, "line 2: class name 'school\\tbus 💥' has characters"),
    (vocabulary_file_missing, "vocabulary.file: "),
    (vocabulary_holdout_too_many, "vocabulary.holdout_combination: voc has only 0 classes"),
    (prompt_without_its_class, "does not mention its class"),
    (prompt_class_outside_vocabulary, "class id 999 outside the vocabulary (1..252)"),
    (prompt_duplicate_id, "duplicate prompt id 'r000001-000'"),
    (input_manifest_missing, "empty/manifest.parquet: manifest not found"),
    (every_image_unreadable, "label: none of the 12 pairs"),
    (labeler_mask_wrong_size, "labeler 'bad_size' returned a 8x8 mask for the 64x64 image"),
    (out_of_memory_at_batch_of_one, "generate (test): out of memory on a batch of 1"),
    (disk_full_generate, "disk full while writing"),
    (disk_full_label, "disk full while writing"),
    (bad_launch, "bad launch: RANK=3 must be in [0, WORLD_SIZE=2)"),
    (
        unknown_backend,
        "unknown labeler 'grounded_samm' (available: difference, grounded_proxy, grounded_sam, ",
    ),
]


@pytest.mark.parametrize("setup, culprit", FATAL, ids=[f.__name__ for f, _ in FATAL])
def test_fatal_bad_input_is_one_line_and_non_zero(base, tmp_path, monkeypatch, capsys, setup, culprit):  # fmt: skip
    _copy(base, tmp_path, "vocabulary", "prompts", "generate", "params.yaml")
    kw = {"monkeypatch": monkeypatch} if "monkeypatch" in setup.__code__.co_varnames else {}
    action = setup(tmp_path, **kw)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        user_errors(action)()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert culprit in errors[0] and "Traceback" not in err


@pytest.mark.parametrize(
    "setup, stage, culprit",
    [
        (params_unknown_key, "generate", "generate.batchsize: unknown key"),
        (prompt_without_its_class, "generate", "does not mention its class"),
        (every_image_unreadable, "label", "label: none of the 12 pairs"),
    ],
    ids=["params_unknown_key", "prompt_without_its_class", "every_image_unreadable"],
)
def test_stage_script_prints_one_line(base, tmp_path, setup, stage, culprit):
    """The real entrypoints, as DVC runs them."""
    _copy(base, tmp_path, "vocabulary", "prompts", "generate", "params.yaml")
    setup(tmp_path)
    res = run_stage(stage, tmp_path, "out", "--cache", str(tmp_path / "cache"))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in res.stderr, res.stderr


# --------------------------------------------------------------------------------------------
# model sources: each stage that loads a model prints the README's line, word for word
# --------------------------------------------------------------------------------------------
def _readme_line(test_id: str) -> str:
    """The last column of the README's bad-input row ``test_id`` (between backticks)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"| `{test_id}` |"):
            return line.rstrip(" |").rsplit("| `", 1)[1].rstrip("`")
    raise AssertionError(f"README.md has no bad-input row {test_id}")


MODEL_SOURCES = [
    # (test id, stage, params given, environment)
    (
        "model_path_missing",
        "generate",
        {"generate": {"backend": "diffusers", "diffusers": {"checkpoint": "./models/sd15"}}},
        {"HF_HUB_OFFLINE": "1"},
    ),
    (
        "hub_id_offline_not_cached",
        "label",
        {"label": {"backend": "grounded_sam", "grounded_sam": {"detector_checkpoint": "org/name"}}},
        {"HF_HUB_OFFLINE": "1"},
    ),
    (  # online, and the hub at a closed local port: refused at once, as without a network
        "hub_unreachable",
        "train",
        {"train": {"architecture": "clip", "clip": {"checkpoint": "org/name"}}},
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ),
]


@pytest.mark.parametrize(
    "test_id, stage, given, environ", MODEL_SOURCES, ids=[c[0] for c in MODEL_SOURCES]
)
def test_model_source_error_is_the_readme_line(base, tmp_path, test_id, stage, given, environ):
    """Through the stage script, as DVC runs it, in an empty Hugging Face cache: exit 2 and
    exactly the README's line on stderr, before any model is loaded."""
    import os
    import subprocess
    import sys

    t = _copy(base, tmp_path, "vocabulary", "prompts", "generate", "params.yaml")
    for section, update in given.items():
        _params(t, section, update)
    out = {
        "generate": ["--prompts", t / "prompts", "--out", t / "out", "--cache", t / "c"],
        "label": ["--generated", t / "generate", "--out", t / "out", "--metrics", t / "m.json"],
        "train": [
            "--data",
            t / "nowhere",
            "--out",
            t / "out",
            "--metrics",
            t / "m.json",
            "--live",
            t / "live",
        ],  # fmt: skip
    }[stage]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"PYTHONPATH": str(ROOT / "src"), "HF_HOME": str(t / "hf"), **environ}
    res = subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--vocab", str(t / "vocabulary"),
         *map(str, out), "--params-file", str(t / "params.yaml")],
        cwd=t, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert errors == [f"error: {_readme_line(test_id)}"], res.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# nothing already done is lost
# --------------------------------------------------------------------------------------------
def test_disk_full_keeps_finished_samples_and_resume_completes(base, tmp_path, monkeypatch):
    t = _copy(base, tmp_path, "vocabulary", "prompts", "params.yaml")
    with monkeypatch.context() as m:
        _fill_disk_after(m, 10)  # 3 PNGs per pair: 3 pairs made, the 4th fails
        with pytest.raises(SystemExit):
            user_errors(_gen(t))()
    assert len(list(iter_keys(SampleCache(t / "cache")))) == 3
    assert not list((t / "cache").rglob("*.tmp"))  # the half-made entry was removed
    _gen(t)()  # space freed: resume
    assert digest(t / "out") == digest(base / "generate")


def test_error_after_some_batches_keeps_them(base, tmp_path):
    """Any crash mid-run (here a backend bug on the 3rd batch) keeps the batches before it."""
    t = _copy(base, tmp_path, "prompts")

    class Crashes(ProceduralGenerator):
        n = 0

        def generate(self, batch):
            Crashes.n += 1
            if Crashes.n == 3:
                raise RuntimeError("backend bug")
            return super().generate(batch)

    g = GenerateParams(batch_size=2)
    with pytest.raises(RuntimeError):
        run_generate(t / "prompts", t / "out", g, N, Crashes(g.procedural, 64, 64),
                     cache_dir=t / "c")  # fmt: skip
    assert len(list(iter_keys(SampleCache(t / "c")))) == 4


# --------------------------------------------------------------------------------------------
# handled per sample: recorded, warned, the run goes on
# --------------------------------------------------------------------------------------------
def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # the file may be a hard link into a cache: never write through it
    path.write_bytes(data[: len(data) // 2])


def _oracle_wrong_size(path: Path) -> None:
    path.unlink()
    mio.write_mask(path, np.zeros((32, 32), np.int64), N)


@pytest.mark.parametrize(
    "column, damage, message",
    [
        ("image", _corrupt, "cannot read image"),
        ("cf_image", _truncate, "cannot read image"),
        ("oracle_mask", _oracle_wrong_size, "mask is 32x32 but the image is 64x64"),
    ],
    ids=["corrupt_image", "truncated_image", "mask_wrong_size"],
)
def test_bad_sample_is_recorded_and_warned(base, tmp_path, capsys, column, damage, message):
    t = _copy(base, tmp_path, "vocabulary", "generate", "params.yaml")
    frame = read_manifest(t / "generate")
    bad = t / "generate" / frame[column].iloc[4]
    damage(bad)
    _lab(t)()
    err = capsys.readouterr().err
    assert f"warning: rank 0: {bad}" in err and message in err
    out = read_manifest(t / "label")
    assert out["mask"].isna().tolist() == [i == 4 for i in range(12)]
    assert message in out["meta"].iloc[4]
    assert reasons_for(out.iloc[4].to_dict(), FilterParams()) == ["unreadable"]


def test_out_of_memory_halves_the_batch_and_gives_the_same_bytes(base, tmp_path):
    class Oom(ProceduralGenerator):
        sizes: list[int] = []

        def generate(self, batch):
            Oom.sizes.append(len(batch))
            if len(batch) > 3:
                raise MemoryError  # stands for torch.cuda.OutOfMemoryError on a GPU
            return super().generate(batch)

    t = _copy(base, tmp_path, "prompts")
    g = GenerateParams(batch_size=12)
    run_generate(t / "prompts", t / "out", g, N, Oom(ProceduralGeneratorParams(), 64, 64))
    assert Oom.sizes[:3] == [12, 6, 3] and set(Oom.sizes[2:]) == {3}
    assert digest(t / "out") == digest(base / "generate")


def test_torch_oom_is_recognised():
    torch = pytest.importorskip("torch")
    from magicseg.batching import is_oom

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory")) and is_oom(MemoryError())
    assert not is_oom(RuntimeError("other"))


def test_catalogue_table_lists_every_case():
    table = (ROOT / "docs" / "bad_inputs.md").read_text()
    names = (
        [f.__name__ for f, _ in FATAL]
        + [c[0] for c in MODEL_SOURCES]
        + [
            "corrupt_image",
            "truncated_image",
            "mask_wrong_size",
            "out_of_memory_halves_the_batch",
            "disk_full_keeps_finished_samples",
        ]
    )
    missing = [n for n in names if f"`{n}`" not in table]
    assert not missing, missing
