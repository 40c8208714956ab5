"""Every bad input in the catalogue ends in exit 2, one ``error:`` line naming the problem, and a clean store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.bad_inputs import CATALOGUE, BadInput
from tests.conftest import optipipe_stderr


def _store_of(argv: list[str]) -> Path | None:
    return Path(argv[argv.index("--store") + 1]) if "--store" in argv else None


def _failed_stages(store: Path) -> set[str]:
    failed = set()
    for run_file in (store / "runs").glob("*.json") if (store / "runs").is_dir() else []:
        record = json.loads(run_file.read_text())
        failed |= {stage["name"] for stage in record.get("stages", []) if stage["state"] == "failed"}
    return failed


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("entry", [pytest.param(entry, id=entry.id) for entry in CATALOGUE])
def test_bad_input_prints_one_clear_line(entry: BadInput, tmp_path: Path, capsys):
    argv = entry.make(tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    err = optipipe_stderr(captured.err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    print(f"[{entry.id}] exit {code}: {' | '.join(errors) or '(no error line)'}; stdout tail: {captured.out[-300:]!r}")
    assert code == 2, f"exit {code}; stderr:\n{err[-3000:]}"
    assert len(errors) == 1, f"expected one 'error:' line, got {len(errors)}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert entry.expect in errors[0], errors[0]

    store = _store_of(argv)
    if store is not None and store.is_dir():
        failed = _failed_stages(store)
        for manifest in (store / "artifacts").glob("*/manifest.json"):
            assert json.loads(manifest.read_text())["stage"] not in failed, f"artifact of a failed stage: {manifest}"
        leftovers = list((store / "tmp").iterdir()) if (store / "tmp").is_dir() else []
        assert leftovers == [], f"left in {store / 'tmp'}: {leftovers}"
