"""Small inputs for the scale-out, resume and bad-input tests: vocabulary + prompts + params."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from magicseg.core.config import Params, params_to_dict
from magicseg.core.io import write_manifest
from magicseg.core.vocabulary import build_vocabulary
from magicseg.prompts.stage import run_prompts

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(root: Path, requests: int = 6, per_request: int = 2, **generate) -> Params:
    """``root/vocabulary``, ``root/prompts`` and ``root/params.yaml``; returns the params."""
    base = Params()
    p = base.model_copy(
        update={
            "prompts": base.prompts.model_copy(
                update={"requests": requests, "per_request": per_request}
            ),
            "generate": base.generate.model_copy(update=generate),
        }
    )
    vocab = build_vocabulary("procedural", holdout_combination=8, seed=p.seed)
    write_manifest(root / "vocabulary", vocab.to_frame())
    run_prompts(vocab, p.prompts, p.seed, root / "prompts")
    (root / "params.yaml").write_text(yaml.safe_dump(params_to_dict(p), sort_keys=False))
    return p


def digest(directory: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``directory``."""
    return {
        f.relative_to(directory).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def stage_cmd(stage: str, root: Path, out: str, *extra: str) -> list[str]:
    """The stage script's command line on the inputs under ``root``."""
    args = {
        "generate": ["--prompts", str(root / "prompts")],
        "label": ["--generated", str(root / "generate"), "--metrics", str(root / f"{out}.json")],
    }[stage]
    return [
        str(ROOT / "stages" / f"{stage}.py"),
        "--vocab",
        str(root / "vocabulary"),
        *args,
        "--out",
        str(root / out),
        "--params-file",
        str(root / "params.yaml"),
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    """Environment for stage subprocesses: this worktree's ``src`` first, one thread."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if k not in extra:
            e.pop(k, None)
    return e


def run_stage(stage: str, root: Path, out: str, *extra: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *stage_cmd(stage, root, out, *extra)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )
