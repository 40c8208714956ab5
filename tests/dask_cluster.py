"""A real Dask cluster on loopback for tests: a ``dask scheduler`` and ``dask worker`` processes, each its own OS
process started with the venv's ``dask`` command, stopped (and reaped) when the block ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tests.s3_server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).parent / "dask")
STARTUP_SECONDS = 120


@dataclass
class LoopbackCluster:
    """The running cluster: its scheduler address, and each worker's process and address, by worker name."""

    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    workers: dict[str, tuple[subprocess.Popen, str]] = field(default_factory=dict)

    def runner(self) -> str:
        """The ``--runner`` value for this cluster."""
        return self.address.replace("tcp://", "dask://")

    def worker_of_pid(self, pid: int) -> str | None:
        """The name of the worker whose process has ``pid``."""
        return next((name for name, (process, _) in self.workers.items() if process.pid == pid), None)

    def alive(self) -> list[subprocess.Popen]:
        """The cluster's processes still running."""
        return [process for process in self.processes if process.poll() is None]


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env, cwd=REPO_ROOT,
                            start_new_session=True)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@contextmanager
def loopback_cluster(logs: Path, workers: int = 2, env: dict[str, str] | None = None,
                     worker_env: Callable[[int], dict[str, str]] | None = None) -> Iterator[LoopbackCluster]:
    """Start a scheduler and ``workers`` single-threaded workers without nannies (a killed worker stays dead, so
    its stage must move to another), wait until all have joined, yield the cluster, then stop every process.
    ``env`` is added to every process's environment, ``worker_env(index)`` to worker ``index``'s."""
    from distributed import Client

    logs.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    address = f"tcp://127.0.0.1:{free_port()}"
    cluster = LoopbackCluster(address)
    with ExitStack() as cleanup:
        cleanup.callback(_stop, cluster.processes)
        cluster.processes.append(_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                         "--no-dashboard"], logs / "scheduler.log", environment))
        for index in range(workers):
            name = f"worker-{index}"
            process = _start([DASK, "worker", address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                              "--host", "127.0.0.1"], logs / f"{name}.log", {**environment, **(worker_env(index) if worker_env else {})})
            cluster.processes.append(process)
            cluster.workers[name] = (process, "")
        with Client(address, timeout=STARTUP_SECONDS) as client:
            client.wait_for_workers(workers, timeout=STARTUP_SECONDS)
            for worker_address, info in client.scheduler_info()["workers"].items():
                process, _ = cluster.workers[info["name"]]
                cluster.workers[info["name"]] = (process, worker_address)
        yield cluster
