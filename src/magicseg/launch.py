"""Start a stage script in the processes ``params.yaml``'s ``launch`` section asks for.

``dvc.yaml`` runs ``generate``, ``label`` and ``train`` as
``python -m magicseg.launch -- stages/<stage>.py <args>``, so ``dvc repro`` and
``dvc exp run -S launch.processes=8`` start them on every GPU and DVC records them as usual:

- one process in all (``processes: 1``, ``nodes: 1``): plain ``python <script> <args>``;
- ``torchrun``: ``python -m torch.distributed.run --nproc-per-node P`` (``--standalone`` on one
  node; on several, one torchrun per node under ``srun`` with a c10d rendezvous);
- ``accelerate``: ``accelerate launch --multi_gpu --num_processes P*N`` (on several nodes one
  per node under ``srun``, each with its ``--machine_rank``);
- ``srun``: ``srun --nodes N --ntasks-per-node P``, one SLURM task per process; each task maps
  ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` to ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
  and gets the rendezvous as ``MASTER_ADDR``/``MASTER_PORT``.

Several nodes need a SLURM allocation (``scripts/slurm/magicseg.sbatch``): the command runs on
the allocation's first node and ``srun`` starts the others. The stages give the outputs of one
process whatever the number of processes (``docs/scale_out.md``), so the launch decides how a
stage runs, never what it makes. The launcher replaces this process (``exec``): DVC sees its
exit status.

Usage: ``python -m magicseg.launch [--params-file params.yaml] [--dry-run] -- SCRIPT ARGS...``
(``--dry-run`` prints the command instead).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from magicseg.core.config import LaunchParams, load_params
from magicseg.core.errors import ConfigError

DEFAULT_PORT = 29500
"""Rendezvous port on the allocation's first node when ``launch.rdzv_endpoint`` is null."""
ROLE_NODE = "--slurm-node"
"""Internal: this process is ``srun``'s task on one node; it starts the node's launcher."""
ROLE_TASK = "--slurm-task"
"""Internal: this process is one ``srun`` task = one rank; it starts the script."""


def visible_gpus() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(launch: LaunchParams, gpus: int) -> int:
    """``launch.processes`` with ``auto`` resolved: the visible GPUs, 1 without any."""
    if launch.processes == "auto":
        return max(gpus, 1)
    return launch.processes


@dataclass(frozen=True)
class Slurm:
    """The facts of the SLURM allocation this runs in (``job_id`` None: not in one)."""

    job_id: str | None = None
    nodes: int = 0
    first_node: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Slurm:
        job = env.get("SLURM_JOB_ID")
        if job is None:
            return cls()
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        return cls(job, nodes, _first_host(env.get("SLURM_JOB_NODELIST", "")))


def _first_host(nodelist: str) -> str | None:
    """The first host name of a SLURM node list (``scontrol show hostnames``), None if empty."""
    if not nodelist:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.CalledProcessError):  # no scontrol: "node[01-04],gpu7" forms
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def endpoint(launch: LaunchParams, slurm: Slurm) -> tuple[str, int]:
    """The rendezvous host and port: ``launch.rdzv_endpoint``, else the allocation's first
    node at :data:`DEFAULT_PORT`."""
    if launch.rdzv_endpoint is not None:
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        return host, int(port)
    if slurm.first_node is None:
        raise ConfigError("launch.rdzv_endpoint: null needs SLURM_JOB_NODELIST; set host:port")
    return slurm.first_node, DEFAULT_PORT


def check_allocation(launch: LaunchParams, slurm: Slurm) -> None:
    """ConfigError naming the key when the launch needs a SLURM allocation it is not in."""
    if launch.nodes > 1 and slurm.job_id is None:
        raise ConfigError(
            f"launch.nodes: {launch.nodes} nodes need a SLURM allocation (run under sbatch or "
            "salloc: scripts/slurm/magicseg.sbatch); SLURM_JOB_ID is not set"
        )
    if launch.nodes > slurm.nodes > 0:
        raise ConfigError(
            f"launch.nodes: {launch.nodes} nodes asked, the allocation {slurm.job_id} has "
            f"{slurm.nodes}"
        )


def node_command(
    launch: LaunchParams, script: Sequence[str], procs: int, slurm: Slurm, node_rank: int = 0
) -> list[str]:
    """The command one node runs: its launcher starting ``procs`` processes of ``script``."""
    py = sys.executable
    if launch.launcher == "accelerate":
        cmd = [py, "-m", "accelerate.commands.launch", "--multi_gpu"]
        cmd += ["--num_processes", str(procs * launch.nodes), "--num_machines", str(launch.nodes)]
        if launch.nodes > 1:
            host, port = endpoint(launch, slurm)
            cmd += ["--machine_rank", str(node_rank), "--main_process_ip", host]
            cmd += ["--main_process_port", str(port)]
        elif launch.rdzv_endpoint is not None:
            host, port = endpoint(launch, slurm)
            cmd += ["--main_process_ip", host, "--main_process_port", str(port)]
        return [*cmd, *script]
    # torchrun
    cmd = [py, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)]
    if launch.nodes == 1 and launch.rdzv_endpoint is None:
        return [*cmd, "--standalone", *script]
    host, port = endpoint(launch, slurm)
    rdzv_id = launch.rdzv_id or slurm.job_id or "magicseg"
    cmd += ["--nnodes", str(launch.nodes), "--rdzv-backend", "c10d"]
    cmd += ["--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", rdzv_id]
    return [*cmd, *script]


def command(
    launch: LaunchParams,
    script: Sequence[str],
    gpus: int,
    slurm: Slurm,
    params_file: str | Path = "params.yaml",
) -> list[str]:
    """The whole command that runs ``script`` (the stage script and its arguments) as
    ``launch`` says, started from the machine ``dvc`` runs on."""
    procs = processes_per_node(launch, gpus)
    if procs * launch.nodes == 1:
        return [sys.executable, *script]
    if launch.launcher != "srun" and launch.nodes == 1:
        return node_command(launch, script, procs, slurm)
    if launch.launcher == "srun" and slurm.job_id is None:
        raise ConfigError(
            "launch.launcher: srun needs a SLURM allocation (sbatch or salloc); "
            "SLURM_JOB_ID is not set"
        )
    check_allocation(launch, slurm)
    per_node = procs if launch.launcher == "srun" else 1
    role = ROLE_TASK if launch.launcher == "srun" else ROLE_NODE
    srun = ["srun", "--nodes", str(launch.nodes), "--ntasks-per-node", str(per_node)]
    srun += ["--kill-on-bad-exit=1"]
    me = [sys.executable, "-m", "magicseg.launch", "--params-file", str(params_file)]
    return [*srun, *me, role, "--", *script]


def task_env(launch: LaunchParams, slurm: Slurm, env: Mapping[str, str]) -> dict[str, str]:
    """One ``srun`` task's environment as torchrun would give it: ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` from SLURM's."""
    host, port = endpoint(launch, slurm)
    out = dict(env)
    out.update(
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=env["SLURM_NTASKS"],
        LOCAL_RANK=env["SLURM_LOCALID"],
        LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
    )
    return out


def _parse(argv: list[str]) -> tuple[Path, str | None, bool, list[str]]:
    if "--" not in argv:
        raise ConfigError("usage: python -m magicseg.launch [--params-file P] -- SCRIPT ARGS...")
    cut = argv.index("--")
    opts, script = argv[:cut], argv[cut + 1 :]
    if not script:
        raise ConfigError("magicseg.launch: no script after --")
    params_file, role, dry = Path("params.yaml"), None, False
    it = iter(opts)
    for opt in it:
        if opt == "--params-file":
            params_file = Path(next(it, ""))
        elif opt in (ROLE_NODE, ROLE_TASK):
            role = opt
        elif opt == "--dry-run":
            dry = True
        else:
            raise ConfigError(f"magicseg.launch: unknown option {opt!r}")
    return params_file, role, dry, script


def main(argv: list[str] | None = None) -> None:
    params_file, role, dry, script = _parse(sys.argv[1:] if argv is None else argv)
    launch = load_params(params_file).launch
    slurm = Slurm.from_env()
    env = dict(os.environ)
    needs_gpus = launch.processes == "auto"
    gpus = visible_gpus() if needs_gpus else 0
    if role == ROLE_TASK:
        cmd, env = [sys.executable, *script], task_env(launch, slurm, env)
    elif role == ROLE_NODE:
        procs = processes_per_node(launch, gpus)
        cmd = node_command(launch, script, procs, slurm, int(env.get("SLURM_NODEID", "0")))
    else:
        cmd = command(launch, script, gpus, slurm, params_file)
    if dry:
        print(shlex.join(cmd))
        return
    print(f"magicseg.launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    from magicseg.core.stage import user_errors

    user_errors(main)()
