"""Scale-out, per-sample cache and resume: the data stages give the same bytes whatever the
number of processes, the batch size, the cache state or the kills along the way."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.scaleout_helpers import digest, env, make_inputs, stage_cmd

from magicseg.core.catalogue import CATALOGUE
from magicseg.core.config import LabelParams
from magicseg.core.errors import DataError
from magicseg.core.io import read_manifest
from magicseg.distributed import current, owner, shard
from magicseg.generate import TEST_SLEEP_ENV, run_generate
from magicseg.generate.procedural import ProceduralGenerator
from magicseg.label import run_label
from magicseg.samplecache import SampleCache, iter_keys, materialise, remove_stale_temps

N_CLASSES = len(CATALOGUE)


def _reference(root: Path, p) -> None:
    """One process, no cache dir: the plain run every other run must equal."""
    run_generate(root / "prompts", root / "generate", p.generate, N_CLASSES)
    run_label(root / "generate", root / "label", p.label, N_CLASSES, root / "label.json")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    p = make_inputs(root, requests=6)
    _reference(root, p)
    return root, p


def test_owner_partitions_ids_for_any_world_size():
    ids = [f"r{i:06d}-{k:03d}" for i in range(200) for k in range(2)]
    for world in (1, 2, 3, 7):
        parts = [shard(ids, current(r, world)) for r in range(world)]
        flat = sorted(i for part in parts for i in part)
        assert flat == list(range(len(ids)))  # no duplicates, no gaps
        if world > 1:
            sizes = [len(x) for x in parts]
            assert min(sizes) > 0.6 * len(ids) / world  # roughly balanced
    assert owner("r000001-000", 4) == owner("r000001-000", 4)
    with pytest.raises(DataError, match="RANK=2 must be in"):
        current(2, 2)


def test_batch_size_and_cache_state_do_not_change_bytes(ref, tmp_path):
    root, p = ref
    cache = tmp_path / "cache"
    for run in ("cold", "warm"):
        out = tmp_path / run
        gen = p.generate.model_copy(update={"batch_size": 1})
        run_generate(root / "prompts", out / "generate", gen, N_CLASSES, cache_dir=cache / "g")
        run_label(
            out / "generate", out / "label", p.label, N_CLASSES, out / "label.json",
            batch_size=5, cache_dir=cache / "l",
        )  # fmt: skip
        assert digest(out / "generate") == digest(root / "generate")
        assert digest(out / "label") == digest(root / "label")
        assert (out / "label.json").read_text() == (root / "label.json").read_text()
    # outputs are hard links into the cache (no copy), and no temp file is left anywhere
    img = read_manifest(tmp_path / "warm" / "generate")["image"].iloc[0]
    assert os.stat(tmp_path / "warm" / "generate" / img).st_nlink >= 2
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "warm/generate/.shards").exists()


def test_two_ranks_by_file_polling_equal_one_process(ref, tmp_path):
    """Ranks without a rendezvous (plain SLURM tasks): rank 0 polls for the shards."""
    root, p = ref
    out = tmp_path / "out"
    shard1 = run_generate(root / "prompts", out / "generate", p.generate, N_CLASSES, rank=1,
                          world_size=2, cache_dir=tmp_path / "g")  # fmt: skip
    assert 0 < len(shard1) < 12 and not (out / "generate" / "manifest.parquet").exists()
    run_generate(root / "prompts", out / "generate", p.generate, N_CLASSES, rank=0, world_size=2,
                 cache_dir=tmp_path / "g")  # fmt: skip
    for r in (1, 0):
        run_label(out / "generate", out / "label", p.label, N_CLASSES, out / "label.json",
                  rank=r, world_size=2)  # fmt: skip
    assert digest(out / "generate") == digest(root / "generate")
    assert digest(out / "label") == digest(root / "label")
    assert (out / "label.json").read_text() == (root / "label.json").read_text()


def test_torchrun_two_processes_equal_one_process(ref, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo barrier) on both stage scripts."""
    root, _ = ref
    for name in ("vocabulary", "prompts", "params.yaml"):
        os.symlink(root / name, tmp_path / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = " ".join(stage_cmd("generate", tmp_path, "generate", "--cache", str(tmp_path / "cg")))
    lab = " ".join(stage_cmd("label", tmp_path, "label", "--cache", str(tmp_path / "cl")))
    py = sys.executable
    cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), "--no-python", "bash", "-c",
           f"{py} {gen} && {py} {lab}"]  # fmt: skip
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-6000:]
    assert "(rank 1 of 2)" in res.stdout and "generate: 12 pairs" in res.stdout
    assert digest(tmp_path / "generate") == digest(root / "generate")
    assert digest(tmp_path / "label") == digest(root / "label")
    assert (tmp_path / "label.json").read_text() == (root / "label.json").read_text()


def test_killed_generate_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL the generate stage at random points, three times, then let it finish."""
    root = tmp_path
    p = make_inputs(root, requests=20, per_request=2)  # 40 pairs
    run_generate(root / "prompts", root / "reference", p.generate, N_CLASSES)
    cache = SampleCache(root / "cache")
    cmd = [
        sys.executable,
        *stage_cmd("generate", root, "generate", "--cache", str(cache.directory)),
    ]
    rng = random.Random(9)
    counts = []
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env(**{TEST_SLEEP_ENV: "0.03"}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        before = len(list(iter_keys(cache)))
        deadline = time.monotonic() + 30
        # kill once it has made some new pairs, after a random extra moment
        while len(list(iter_keys(cache))) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(len(list(iter_keys(cache))))
        assert not (root / "generate" / "manifest.parquet").exists()  # killed mid-run
    assert counts[0] < counts[1] < counts[2] < 40  # progress kept across kills
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{counts[2]} of 40 pairs from the cache" in res.stderr
    assert digest(root / "generate") == digest(root / "reference")


class CountingGenerator(ProceduralGenerator):
    calls = 0

    def generate(self, batch):
        CountingGenerator.calls += len(batch)
        return super().generate(batch)


def test_growing_the_dataset_generates_only_new_samples(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    ps = make_inputs(small, requests=3)
    pb = make_inputs(big, requests=5)
    gen = CountingGenerator(pb.generate.procedural, 64, 64)
    run_generate(small / "prompts", small / "out", ps.generate, N_CLASSES, gen,
                 cache_dir=tmp_path / "c")  # fmt: skip
    assert CountingGenerator.calls == 6
    run_generate(big / "prompts", big / "out", pb.generate, N_CLASSES, gen,
                 cache_dir=tmp_path / "c")  # fmt: skip
    assert CountingGenerator.calls == 10  # only the 4 new pairs
    fresh = run_generate(big / "prompts", big / "fresh", pb.generate, N_CLASSES, gen)
    assert digest(big / "out") == digest(big / "fresh") and len(fresh) == 10
    # a param that changes the samples makes new keys: all regenerated
    proc = pb.generate.procedural.model_copy(update={"drift": 0.5})
    drift = pb.generate.model_copy(update={"procedural": proc})
    before = CountingGenerator.calls
    run_generate(big / "prompts", big / "d", drift, N_CLASSES, CountingGenerator(
        drift.procedural, 64, 64), cache_dir=tmp_path / "c")  # fmt: skip
    assert CountingGenerator.calls - before == 10


def test_label_cache_follows_input_bytes(ref, tmp_path):
    """A regenerated image is relabelled; the others come from the cache."""
    root, p = ref
    import shutil

    shutil.copytree(root / "generate", tmp_path / "generate")
    run_label(tmp_path / "generate", tmp_path / "l1", p.label, N_CLASSES, cache_dir=tmp_path / "c")
    frame = read_manifest(tmp_path / "generate")
    target = tmp_path / "generate" / frame["image"].iloc[0]
    target.unlink()  # break the hard link before changing the bytes
    shutil.copyfile(root / "generate" / frame["image"].iloc[1], target)
    cache = SampleCache(tmp_path / "c")
    n = len(list(iter_keys(cache)))
    run_label(tmp_path / "generate", tmp_path / "l2", p.label, N_CLASSES, cache_dir=cache.directory)
    assert len(list(iter_keys(cache))) == n + 1


def test_materialise_links_or_copies_atomically(tmp_path, monkeypatch):
    src = tmp_path / "a.png"
    src.write_bytes(b"x" * 10)
    materialise(src, tmp_path / "out" / "b.png")
    assert os.path.samefile(src, tmp_path / "out" / "b.png")

    def no_links(*a):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    materialise(src, tmp_path / "out" / "c.png")
    assert (tmp_path / "out" / "c.png").read_bytes() == b"x" * 10
    assert not os.path.samefile(src, tmp_path / "out" / "c.png")
    (tmp_path / "out" / ".d.png.123.tmp").write_bytes(b"half")
    assert remove_stale_temps(tmp_path / "out") == 1


def test_label_params_block_in_the_key(ref, tmp_path):
    root, p = ref
    run_label(root / "generate", tmp_path / "a", p.label, N_CLASSES, cache_dir=tmp_path / "c")
    strict = LabelParams.model_validate({"difference": {"threshold": 0.3}})
    run_label(root / "generate", tmp_path / "b", strict, N_CLASSES, cache_dir=tmp_path / "c")
    assert len(list(iter_keys(SampleCache(tmp_path / "c")))) == 24
