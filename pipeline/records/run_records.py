"""Run records in a store: ``runs/<run_id>.json``, one per run, written atomically by the run's driver and read
back through ``RunRecord``; a damaged record is listed as damaged, never raised; a ``running`` record whose
process on this host is gone reads as ``crashed``. ``ArtifactStore`` inherits these methods; an object store
overrides the reads to sync its records first. Torch-free.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.errors import StoreError
from pipeline.records.files import json_problem, read_text_nofollow
from pipeline.records.models import RunRecord
from pipeline.records.parse import parse_record

LISTED_MATCHES = 10  # run ids an ambiguous prefix's error lists


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def with_observed_state(record: dict[str, Any]) -> dict[str, Any]:
    """A run record whose ``running`` state is shown as ``crashed`` when its process on this host is gone."""
    if record.get("state") == "running" and record.get("host") == socket.gethostname() and record.get("pid"):
        if not process_alive(int(record["pid"])):
            message = record.get("message") or f"process {record['pid']} ended without finishing the run"
            return {**record, "state": "crashed", "message": message}
    return record


def declared_json_problem(path: Path, model: type[BaseModel], mismatch: str) -> tuple[Any, str | None]:
    """The JSON value in ``path`` and what is wrong with it as a ``model`` (None when nothing is)."""
    try:
        value, problem = json_problem(read_text_nofollow(path))
    except OSError as error:
        value, problem = None, "is a symbolic link" if path.is_symlink() else f"unreadable ({error.strerror})"
    if problem is None:
        try:
            parse_record(model, value, mismatch)
        except StoreError as error:
            problem = str(error)
    return value, problem


def ambiguous_matches(reference: str, matches: list[dict[str, Any]], damaged_matches: list[tuple[Path, str]]) -> str:
    """The error text for a run prefix that matches several runs: up to ``LISTED_MATCHES`` of them, newest first,
    each with its recipe and start time (a damaged record says so instead)."""
    described = [(record["run_id"], f"recipe {record['recipe']['name']}, started {record['started_at']}") for record in matches]
    described += [(path.stem, "damaged record") for path, _ in damaged_matches]
    described.sort(reverse=True)
    listed = ", ".join(f"{run_id} ({what})" for run_id, what in described[:LISTED_MATCHES])
    unlisted = len(described) - LISTED_MATCHES
    more = f" and {unlisted} more" if unlisted > 0 else ""
    return f"'{reference}' matches {len(described)} runs: {listed}{more}; give more of the id"




class RunRecords:
    """The run-record half of a store rooted at ``root``, with ``runs_dir`` and ``write_json`` from the store."""

    root: Path
    runs_dir: Path

    def run_path(self, run_id: str) -> Path:
        """Where the record of ``run_id`` is stored."""
        return self.runs_dir / f"{run_id}.json"

    def write_run(self, record: dict[str, Any]) -> None:
        """Write (or replace) a run record atomically (a linked record is replaced, never written through)."""
        self.write_json(self.run_path(record["run_id"]), record)

    def load_run_file(self, path: Path) -> dict[str, Any]:
        """A run record file parsed and checked against ``RunRecord``; ``StoreError`` saying what is wrong."""
        record, problem = declared_json_problem(path, RunRecord, "does not match the run record")
        if problem is not None:
            raise StoreError(f"damaged run record {path}: {problem}")
        return with_observed_state(record)

    def read_run(self, run_id: str) -> dict[str, Any]:
        """The run record of ``run_id`` (``crashed`` if it says running but its process is gone)."""
        path = self.run_path(run_id)
        if not path.is_file() and not path.is_symlink():
            raise StoreError(f"no run '{run_id}' in store {self.root}; 'optipipe runs' lists them")
        return self.load_run_file(path)

    def _scan_runs(self) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
        """Every good run record (newest first) and every damaged record file with what is wrong."""
        if not self.runs_dir.is_dir():
            return [], []
        records, damaged = [], []
        for path in sorted(self.runs_dir.glob("*.json"), reverse=True):
            try:
                records.append(self.load_run_file(path))
            except FileNotFoundError:
                continue  # removed since the listing
            except StoreError as error:
                damaged.append((path, str(error).removeprefix(f"damaged run record {path}: ")))
        records.sort(key=lambda record: (record["started_at"], record["run_id"]), reverse=True)
        return records, damaged

    def list_runs(self) -> list[dict[str, Any]]:
        """Every readable run record, newest first; ``damaged_runs`` lists the others."""
        return self._scan_runs()[0]

    def damaged_runs(self) -> list[tuple[Path, str]]:
        """(path, what is wrong) of every run record that is truncated, not an object or missing fields, newest first."""
        return self._scan_runs()[1]

    def resolve_run(self, reference: str) -> dict[str, Any]:
        """A run record by id, unique id prefix, or ``latest``; a damaged record raises ``StoreError`` saying so."""
        runs, damaged = self._scan_runs()
        if not runs and not damaged:
            raise StoreError(f"store {self.root} has no runs yet; start one with 'optipipe run RECIPE --checkpoint CKPT'")
        if reference == "latest":
            newer_damaged = [(path, problem) for path, problem in damaged if not runs or path.stem > runs[0]["run_id"]]
            if not newer_damaged:
                return runs[0]
            path, problem = newer_damaged[0]
            raise StoreError(f"the latest run {path.stem} has a damaged record {path}: {problem}; give an older run's id")
        matches = [record for record in runs if record["run_id"].startswith(reference)]
        damaged_matches = [(path, problem) for path, problem in damaged if path.stem.startswith(reference)]
        if len(matches) + len(damaged_matches) == 1:
            if matches:
                return matches[0]
            path, problem = damaged_matches[0]
            raise StoreError(f"run {path.stem} has a damaged record {path}: {problem}")
        if not matches and not damaged_matches:
            raise StoreError(f"no run matches '{reference}' in store {self.root}; 'optipipe runs' lists them")
        raise StoreError(ambiguous_matches(reference, matches, damaged_matches))


    def has_run(self, run_id: str) -> bool:
        """Whether the store holds a record of ``run_id``."""
        return self.run_path(run_id).is_file()

