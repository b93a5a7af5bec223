"""The ``launch`` section and ``python -m magicseg.launch``: validation, the command each launcher
gets, and the end-to-end ``dvc exp run -S launch.processes=2`` on a miniature project (2 gloo
processes on the CPU), whose generate and label outputs equal a 1-process run's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.helpers import TINY_PRETRAIN

from magicseg.core.config import LaunchParams, Params, params_to_dict, parse_params
from magicseg.core.errors import ConfigError
from magicseg.launch import ROLE_NODE, ROLE_TASK, Slurm, _first_host, command, main, task_env
from magicseg.launch import node_command as node_cmd
from magicseg.preflight import check_launch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPT = ["stages/generate.py", "--out", "data/generate"]
NO_SLURM = Slurm()
JOB = Slurm("4242", 4, "gpu03")


def _launch(**kw) -> LaunchParams:
    return parse_params({"launch": kw}).launch


# --------------------------------------------------------------------------------------------
# the params section
# --------------------------------------------------------------------------------------------
def test_defaults_are_one_plain_process():
    launch = Params().launch
    assert (launch.processes, launch.nodes, launch.launcher) == (1, 1, "torchrun")
    assert command(launch, SCRIPT, gpus=8, slurm=NO_SLURM) == [PY, *SCRIPT]


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"processes": 0}, "launch.processes: must be an integer >= 1 or auto (got 0)"),
        ({"processes": "many"}, "launch.processes: must be an integer >= 1 or auto"),
        ({"processes": True}, "launch.processes: must be an integer >= 1 or auto (got True)"),
        ({"processes": 2.5}, "launch.processes: must be an integer >= 1 or auto (got 2.5)"),
        ({"nodes": 0}, "launch.nodes:"),
        ({"launcher": "mpirun"}, "launch.launcher: Input should be 'torchrun', 'accelerate'"),
        ({"rdzv_endpoint": "node1"}, "launch.rdzv_endpoint: must be host:port"),
        ({"rdzv_endpoint": "node1:99999"}, "launch.rdzv_endpoint: must be host:port"),
        ({"gpus": 8}, "launch.gpus: unknown key"),
    ],
)
def test_bad_values_and_unknown_keys_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_params({"launch": bad})


def test_dvc_exp_run_overrides_compose_into_the_launch_section(tmp_path):
    """What ``dvc exp run -S profile=paper -S launch.processes=8`` writes (Hydra on)."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    overrides = ["profile=paper", "launch.processes=8", "launch.nodes=4"]
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), overrides)
    p = parse_params(yaml.safe_load(out.read_text()))
    assert (p.profile, p.launch.processes, p.launch.nodes) == ("paper", 8, 4)


def test_dvc_yaml_launches_three_stages_and_tracks_launch_where_it_changes_an_output():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    launched = {n for n, s in stages.items() if s["cmd"].startswith("python -m magicseg.launch")}
    assert launched == {"generate", "label", "train"}
    for name in launched:
        assert stages[name]["cmd"].startswith(f"python -m magicseg.launch -- stages/{name}.py ")
    tracked = {n: [k for k in s.get("params", []) if str(k).startswith("launch")]
               for n, s in stages.items()}  # fmt: skip
    assert tracked["train"] == ["launch.processes", "launch.nodes"]
    assert tracked["check"] == ["launch"]  # the pre-flight reads it all
    assert not any(tracked[n] for n in stages if n not in ("train", "check"))


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def test_torchrun_on_one_node_is_standalone():
    cmd = command(_launch(processes=2), SCRIPT, gpus=0, slurm=NO_SLURM)
    assert cmd == [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                   *SCRIPT]  # fmt: skip


def test_auto_is_the_visible_gpus_and_one_process_without_any():
    assert "8" in command(_launch(processes="auto"), SCRIPT, gpus=8, slurm=NO_SLURM)
    assert command(_launch(processes="auto"), SCRIPT, gpus=0, slurm=NO_SLURM) == [PY, *SCRIPT]


def test_accelerate_on_one_node():
    cmd = command(_launch(processes=4, launcher="accelerate"), SCRIPT, gpus=4, slurm=NO_SLURM)
    assert cmd[:4] == [PY, "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert cmd[4:8] == ["--num_processes", "4", "--num_machines", "1"]
    assert cmd[-3:] == SCRIPT


def test_an_endpoint_on_one_node_replaces_standalone():
    cmd = command(_launch(processes=2, rdzv_endpoint="h:1234"), SCRIPT, gpus=2, slurm=NO_SLURM)
    assert "--standalone" not in cmd and cmd[cmd.index("--rdzv-endpoint") + 1] == "h:1234"


def test_several_nodes_or_srun_need_a_slurm_allocation():
    with pytest.raises(ConfigError, match="^launch.nodes: 2 nodes need a SLURM allocation"):
        command(_launch(processes=8, nodes=2), SCRIPT, gpus=8, slurm=NO_SLURM)
    with pytest.raises(ConfigError, match="^launch.launcher: srun needs a SLURM allocation"):
        command(_launch(processes=2, launcher="srun"), SCRIPT, gpus=2, slurm=NO_SLURM)
    with pytest.raises(ConfigError, match="^launch.nodes: 8 nodes asked, the allocation 4242"):
        command(_launch(processes=8, nodes=8), SCRIPT, gpus=8, slurm=JOB)


def test_torchrun_on_several_nodes_runs_one_per_node_under_srun():
    launch = _launch(processes=8, nodes=4)
    cmd = command(launch, SCRIPT, gpus=8, slurm=JOB, params_file="params.yaml")
    assert cmd[:6] == ["srun", "--nodes", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert cmd[6:] == [PY, "-m", "magicseg.launch", "--params-file", "params.yaml", ROLE_NODE,
                       "--", *SCRIPT]  # fmt: skip
    node = node_cmd(launch, SCRIPT, 8, JOB, node_rank=3)
    assert node == [PY, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "4",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu03:29500", "--rdzv-id",
                    "4242", *SCRIPT]  # fmt: skip


def test_accelerate_on_several_nodes_gives_each_node_its_rank():
    launch = _launch(processes=8, nodes=4, launcher="accelerate", rdzv_endpoint="head:6000")
    node = node_cmd(launch, SCRIPT, 8, JOB, node_rank=2)
    i = node.index
    assert node[i("--num_processes") + 1] == "32" and node[i("--num_machines") + 1] == "4"
    assert node[i("--machine_rank") + 1] == "2" and node[i("--main_process_ip") + 1] == "head"
    assert node[i("--main_process_port") + 1] == "6000"


def test_srun_runs_one_task_per_process_and_maps_the_ranks():
    launch = _launch(processes=8, nodes=2, launcher="srun")
    cmd = command(launch, SCRIPT, gpus=8, slurm=JOB)
    assert cmd[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "8"] and ROLE_TASK in cmd
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_NTASKS_PER_NODE": "8(x2)"}  # fmt: skip
    env = task_env(launch, JOB, slurm)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert (env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("8", "gpu03",
                                                                                   "29500")  # fmt: skip


def test_first_host_of_a_node_list_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the list is read by hand
    assert _first_host("gpu[03-04,07]") == "gpu03"
    assert _first_host("a1,b2") == "a1"
    assert _first_host("") is None


def test_cli_dry_run_and_usage(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    data = params_to_dict(Params())
    data["launch"]["processes"] = 3
    params.write_text(yaml.safe_dump(data))
    main(["--params-file", str(params), "--dry-run", "--", *SCRIPT])
    assert "--nproc-per-node 3 --standalone stages/generate.py" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="usage"):
        main(["stages/generate.py"])
    with pytest.raises(ConfigError, match="unknown option '--nproc'"):
        main(["--nproc", "2", "--", *SCRIPT])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(k, None)
    return env


def test_one_process_execs_the_script_and_keeps_its_exit_status(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(Params())))
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint('world', os.environ.get('WORLD_SIZE'))\nsys.exit(3)\n")
    run = subprocess.run([PY, "-m", "magicseg.launch", "--", str(script)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 3 and "world None" in run.stdout


# --------------------------------------------------------------------------------------------
# the pre-flight
# --------------------------------------------------------------------------------------------
def _checks(tmp_path, gpus=0, env=None, run=subprocess.run, **launch) -> dict[str, str]:
    p = parse_params({"launch": launch})
    lines = [c for c in check_launch(p, tmp_path, gpus=gpus, env=env or {}, run=run)]
    assert len({c.key for c in lines}) == len(lines)  # one line each
    return {c.key: c.line() for c in lines}


def test_preflight_processes_against_the_gpus(tmp_path):
    assert (
        _checks(tmp_path)["launch.processes"] == "ok      launch.processes: 1 process (no GPU here)"
    )
    cpu = _checks(tmp_path, processes=2)
    assert cpu["launch.processes"].endswith("2 processes on the CPU: gloo, no GPU here")
    assert cpu["launch.launcher"] == "ok      launch.launcher: torchrun"
    assert _checks(tmp_path, gpus=8, processes="auto")["launch.processes"].startswith(
        "ok      launch.processes: 8 processes, one a GPU: every GPU"
    )
    assert _checks(tmp_path, gpus=8, processes=16)["launch.processes"].startswith(
        "error   launch.processes: 16 processes, 8 GPUs visible"
    )
    assert _checks(tmp_path, gpus=8, processes=2)["launch.processes"].startswith("warning")
    # the global batch (32) must split over the processes
    assert _checks(tmp_path, gpus=8, processes=3)["train.batch_size"].startswith(
        "error   train.batch_size: 32 images a step do not split over 3 processes: make it"
    )


def test_preflight_one_node_checks_the_directories_are_writable(tmp_path):
    line = _checks(tmp_path)["launch.nodes"]
    assert line.startswith("ok      launch.nodes: 1 node: data and .cache/magicseg writable")
    assert "filesystem every node shares" in line
    # the directories are there, no token file is left
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".cache", "data", "magicseg"]
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "data").write_text("a file where the output directory goes")
    line = _checks(blocked)["launch.nodes"]
    assert line.startswith(f"error   launch.nodes: cannot write in {blocked / 'data'}: File exists")


def test_preflight_several_nodes(tmp_path, monkeypatch):
    no_job = _checks(tmp_path, gpus=8, processes=8, nodes=2)
    assert no_job["launch.nodes"].startswith(
        "error   launch.nodes: 2 nodes need a SLURM allocation"
    )
    assert "launch.launcher" not in no_job
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    job = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    calls = []

    def srun(seen_by: int):  # each node's srun task cats the token files it can see
        def run(cmd, **kw):
            calls.append(cmd)
            marks = [Path(m) for m in cmd[cmd.index("cat") + 1 :]]
            out = "".join(f"{n}: {m.read_text()}" for n in range(seen_by) for m in marks)
            return subprocess.CompletedProcess(cmd, int(seen_by < 2), out, "")

        return run

    shared = _checks(tmp_path, 8, job, srun(2), processes=8, nodes=2)
    assert shared["launch.launcher"] == "ok      launch.launcher: torchrun in SLURM job 5"
    assert shared["launch.nodes"].startswith("ok      launch.nodes: all 2 nodes see data and")
    assert calls[0][:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "1"]
    local = _checks(tmp_path, 8, job, srun(1), processes=8, nodes=2)
    assert local["launch.nodes"].startswith("error   launch.nodes: not every node of job 5 sees")
    too_many = _checks(tmp_path, 8, job, srun(2), processes=8, nodes=3)
    assert too_many["launch.nodes"].startswith("error   launch.nodes: 3 nodes asked")


# --------------------------------------------------------------------------------------------
# the sbatch script
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra_env, args, expected",
    [
        ({}, ["-S", "profile=paper"], "exp run -S launch.nodes=4 -S launch.processes=8 "
         "-S launch.launcher=torchrun -S profile=paper"),
        ({"MAGICSEG_LAUNCHER": "srun", "MAGICSEG_PROCESSES": "4"}, ["train"],
         "exp run -S launch.nodes=4 -S launch.processes=4 -S launch.launcher=srun train"),
        ({"MAGICSEG_DVC": "repro"}, [], "repro"),
    ],
)  # fmt: skip
def test_sbatch_script_runs_dvc_once_with_the_jobs_launch(tmp_path, extra_env, args, expected):
    """The script under a fake job (a ``dvc`` that prints its arguments)."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/activate").write_text("")
    (bin_dir / "dvc").write_text('#!/bin/sh\necho "dvc $*" > "$SLURM_SUBMIT_DIR/ran"\n')
    (bin_dir / "dvc").chmod(0o755)
    job = {"SLURM_SUBMIT_DIR": str(tmp_path), "MAGICSEG_VENV": str(venv), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_GPUS_ON_NODE": "8"}  # fmt: skip
    env = {**_env(), **job, **extra_env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    script = ROOT / "scripts/slurm/magicseg.sbatch"
    run = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ran").read_text().strip() == f"dvc {expected}"
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and any("--nodes=" in line for line in header)


# --------------------------------------------------------------------------------------------
# end to end: dvc exp run -S launch.processes=2
# --------------------------------------------------------------------------------------------
MINI = {
    "vocabulary": {"holdout_combination": 4, "holdout_novel_words": 1},
    "prompts": {"requests": 4, "per_request": 3},
    "generate": {"height": 32, "width": 32},
    "pretrain": TINY_PRETRAIN,
    "train": {
        "steps": 2,
        "batch_size": 4,
        "num_sampled": 6,
        "log_every": 1,
        "val_every": 2,
        "val_samples": 4,
        "offline": {"width": 8, "depth": 2, "embed_dim": 16},
    },
    "evaluate": {"test_samples": 4, "gallery_samples": 1},
}
GIT_ID = ["-c", "user.name=magicseg test", "-c", "user.email=test@magicseg.invalid"]
DVC = [PY, "-m", "dvc"]


def _merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) else v
                       for k, v in over.items()}}  # fmt: skip


def _run(args: list[str], cwd: Path) -> str:
    env = _env()
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(cwd / "src")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


def _digest(root: Path, *rels: str) -> dict[str, str]:
    files = [f for rel in rels for f in sorted((root / rel).rglob("*")) if f.is_file()]
    files += [root / rel for rel in rels if (root / rel).is_file()]
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}  # fmt: skip


@pytest.mark.slow
def test_dvc_exp_run_two_processes_records_the_run_and_equals_one_process(tmp_path):
    # 1. A miniature project in a fresh git + DVC repo (committed, nothing reproduced).
    root = tmp_path / "project"
    root.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("dvc.yaml", "stages", "src", "conf", ".gitignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=skip)
        else:
            shutil.copy(src, root / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), MINI)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(DVC + ["init", "-q"], root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    _run(DVC + ["config", "core.analytics", "false"], root)
    _run(DVC + ["config", "core.check_update", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", *GIT_ID, "commit", "-qm", "miniature project"], root)

    # 2. Every stage up to train through DVC, the launched ones in 2 processes; DVC writes the
    # lock (evaluate, one process, is left out to save time).
    log = _run(DVC + ["exp", "run", "-S", "launch.processes=2", "train"], root)
    assert _ran(log) == {"vocabulary", "pretrain", "check", "prompts", "generate", "label",
                         "filter", "train"}  # fmt: skip
    for stage in ("generate", "label", "train"):
        assert f"--nproc-per-node 2 --standalone stages/{stage}.py" in log, stage
    assert re.search(r"generate: \d+ pairs by procedural \(rank 1 of 2\)", log)
    assert re.search(r"label: .*\(rank 1 of 2\)", log)
    assert json.loads((root / "metrics/train.json").read_text())["processes"] == 2
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["launch.processes"] == 2
    assert lock["check"]["params"]["params.yaml"]["launch"]["processes"] == 2
    assert "launch" not in json.dumps(lock["generate"]["params"])  # no launch key tracked
    assert json.loads(_run(DVC + ["status", "--json", "train"], root)) == {}  # the lock is the run
    two = _digest(root, "data/generate", "data/label", "metrics/label.json")
    assert any(k.startswith("data/label/") for k in two) and "metrics/label.json" in two

    # 3. Back to 1 process: the pre-flight (same verdict) and train re-run, no data stage
    # (evaluate, not asked for here, would follow the new model).
    log = _run(DVC + ["exp", "run", "-S", "launch.processes=1", "train"], root)
    assert _ran(log) == {"check", "train"}
    assert json.loads((root / "metrics/train.json").read_text())["processes"] == 1

    # 4. generate and label made again by one process from an empty cache: the same bytes,
    # so DVC finds nothing downstream to re-run.
    shutil.rmtree(root / ".cache/magicseg/generate")
    shutil.rmtree(root / ".cache/magicseg/label")
    log = _run(DVC + ["repro", "--force", "--single-item", "generate", "label"], root)
    assert _ran(log) == {"generate", "label"} and "torch.distributed.run" not in log
    assert "(rank" not in log
    assert _digest(root, "data/generate", "data/label", "metrics/label.json") == two
    assert json.loads(_run(DVC + ["status", "--json", "train"], root)) == {}
