"""Trust and data safety: hostile recipes and ``--set`` values, code next to a recipe, leftovers of a killed run.

Each bad input ends in exit 2 and one ``error:`` line; ``validate`` runs no user code; a killed ``run``
leaves no temporary Prefect server behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.recipe.yaml_lines import MAX_RECIPE_BYTES
from tests.conftest import REPO_ROOT, optipipe_stderr

GOOD_RECIPE = """name: trust
model: {factory: "%s", input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
"""
PEAK_RSS_LIMIT_KIB = 150 * 1024  # validate refusing a recipe needs the interpreter and pydantic, ~40 MiB here
ADDRESS_SPACE_LIMIT = 1 << 30  # a regression would hit MemoryError here instead of taking the machine's memory


def one_error_line(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2, one ``error:`` line and no traceback; return that line."""
    capsys.readouterr()
    code = main(argv)
    err = optipipe_stderr(capsys.readouterr().err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit {code}; stderr:\n{err[-3000:]}"
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def alias_bomb() -> str:
    """A "billion laughs" YAML document: under 500 bytes, 9**10 strings once its aliases are expanded."""
    lines = ['name: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"n{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 10)]
    return "\n".join(lines) + "\n"


def limit_address_space() -> None:
    """In the child before exec: cap its address space so a regression fails with MemoryError."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


# --- 6. recipe bombs --------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: /proc/self/status")
def test_alias_bomb_is_refused_before_it_allocates(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 700
    # VmHWM: the peak RSS of this process since exec (ru_maxrss would count the forked test process too)
    measure = ("import json, sys; from pipeline.cli import main; code = main(['validate', sys.argv[1]]); "
               "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
               "print(json.dumps({'code': code, 'peak_kib': int(peak.split()[1])}))")
    done = subprocess.run([sys.executable, "-c", measure, str(bomb)], check=False, capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, preexec_fn=limit_address_space)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "anchors and aliases" in done.stderr, done.stderr
    assert outcome["peak_kib"] < PEAK_RSS_LIMIT_KIB, f"peak RSS {outcome['peak_kib']} KiB"


def test_anchor_and_alias_are_refused_with_their_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD_RECIPE % "pipeline.zoo:digits_cnn" + "  fused: &f {uses: fuse_conv_bn, needs: [load]}\n  again: *f\n")
    line = one_error_line(["validate", str(recipe)], capsys)
    assert f"{recipe}:5:" in line and "anchors and aliases" in line


def test_recipe_over_the_size_limit_is_refused_without_reading_it(tmp_path, capsys):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(GOOD_RECIPE % "pipeline.zoo:digits_cnn" + "#" * MAX_RECIPE_BYTES + "\n")
    line = one_error_line(["validate", str(recipe)], capsys)
    assert "over 1 MiB" in line


# --- 7. code from the recipe's folder ------------------------------------------------------------------


def test_validate_runs_no_code_of_the_factory_modules(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    (tmp_path / "trust_marker_models.py").write_text(
        f"open({str(marker)!r}, 'w').write('top-level code ran')\n\ndef build():\n    return None\n")
    package = tmp_path / "trust_marker_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('package code ran')\n")
    (package / "nets.py").write_text(f"open({str(marker)!r}, 'w').write('submodule code ran')\n\nclass Net:\n    pass\n")
    for factory in ("trust_marker_models:build", "trust_marker_pkg.nets:Net"):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(GOOD_RECIPE % factory)
        assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert not marker.exists(), marker.read_text()
    assert "trust_marker_models" not in sys.modules and "trust_marker_pkg" not in sys.modules


def test_a_missing_callable_is_found_from_the_source(tmp_path, capsys):
    (tmp_path / "trust_source_models.py").write_text("import torch\n\nclass Net(torch.nn.Module):\n    pass\n\nWIDTH = 8\n")
    recipe = tmp_path / "recipe.yaml"
    for factory, expect in (("trust_source_models:Nett", "has no callable 'Nett' (it has: Net, WIDTH, torch)"),
                            ("trust_source_models:WIDTH", "sets 'WIDTH' to a value, not a callable")):
        recipe.write_text(GOOD_RECIPE % factory)
        assert expect in one_error_line(["validate", str(recipe)], capsys)


@pytest.mark.parametrize("factory", ["os:system", "subprocess:run", "builtins:eval", "trust_reexport:system"])
def test_standard_library_factories_are_refused(factory, tmp_path, capsys):
    (tmp_path / "trust_reexport.py").write_text("from os import system\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD_RECIPE % factory)
    line = one_error_line(["validate", str(recipe)], capsys)
    assert f"{recipe}:2: model.factory:" in line and "standard library" in line


def test_a_module_next_to_the_recipe_never_shadows_an_installed_package(tmp_path):
    marker = tmp_path / "shadowed.txt"
    for name in ("prefect", "sklearn"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}.py imported')\n")
    (tmp_path / "recipe.yaml").write_text(GOOD_RECIPE % "pipeline.zoo:digits_cnn")
    # -P: nothing but what load_recipe adds puts the recipe folder (here also the working directory) on sys.path
    probe = ("import json, sys; from pipeline.recipe import load_recipe; load_recipe('recipe.yaml'); "
             "import prefect, sklearn; print(json.dumps([prefect.__file__, sklearn.__file__, sys.path]))")
    done = subprocess.run([sys.executable, "-P", "-c", probe], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    prefect_file, sklearn_file, search_path = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(tmp_path) in search_path, "the recipe folder is searched, after the installed packages"
    assert "site-packages" in prefect_file and "site-packages" in sklearn_file
    assert not marker.exists(), marker.read_text()


# --- 8. tracebacks and leftovers ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["!!python/object:os.system x", "[1, 2", "\tx", "*a"], ids=["tag", "unclosed", "tab", "alias"])
def test_bad_set_values_are_one_line(value, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD_RECIPE % "pipeline.zoo:digits_cnn")
    line = one_error_line(["validate", str(recipe), "--set", f"load.strict={value}"], capsys)
    assert line.startswith("error: --set 'load.strict=") and "not a plain YAML value" in line


def test_nightly_on_an_empty_checkpoints_folder_is_one_line_before_prefect_starts(tmp_path, capsys):
    (tmp_path / "ckpts").mkdir()
    line = one_error_line(["nightly", str(REPO_ROOT / "recipes" / "nightly.yaml"), "--checkpoints", str(tmp_path / "ckpts"),
                           "--store", str(tmp_path / "store")], capsys)
    assert line == f"error: checkpoints: no checkpoint files in '{tmp_path / 'ckpts'}' (looked for .pt, .pth, .ckpt, .bin, " \
                   ".safetensors, .pt2); point --checkpoints at the folder your training job writes to"


def write_store_with_a_run(store: Path) -> None:
    """A store holding one finished run record."""
    from tests.test_records import run_record

    (store / "runs").mkdir(parents=True)
    (store / "runs" / "run-a.json").write_text(json.dumps(run_record("run-a")))


def test_report_where_reports_cannot_be_created_is_one_line(tmp_path, capsys):
    store = tmp_path / "store"
    write_store_with_a_run(store)
    (store / "reports").write_text("a file where the reports folder would be")
    line = one_error_line(["report", "latest", "--store", str(store)], capsys)
    assert str(store / "reports") in line


def test_report_to_a_read_only_store_is_one_line(tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    write_store_with_a_run(store)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)  # tests run as root here, so chmod cannot make it read-only
    line = one_error_line(["report", "latest", "--store", str(store)], capsys)
    assert "Read-only file system" in line and str(store / "reports") in line


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, read from /proc."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead process its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_server_child(cli: subprocess.Popen, timeout: float) -> list[int]:
    """The children of the running CLI once one of them is Prefect's temporary (uvicorn) server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cli.poll() is None:
        children = children_of(cli.pid)
        if any(b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if is_alive(pid)):
            return children
        time.sleep(0.05)
    pytest.fail(f"no temporary Prefect server appeared under the CLI within {timeout}s (exit {cli.poll()})")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: prctl, /proc")
def test_a_killed_run_leaves_no_temporary_prefect_server(tmp_path):
    from tests.bad_inputs import good_checkpoint

    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API_")}
    environment["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    command = [sys.executable, "-m", "pipeline.cli", "--quiet", "run", str(REPO_ROOT / "recipes" / "demo.yaml"),
               "--checkpoint", str(good_checkpoint(tmp_path)), "--store", str(tmp_path / "store")]
    cli = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        children = wait_for_server_child(cli, timeout=120)
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        deadline = time.monotonic() + 10
        while any(map(is_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if is_alive(pid)], "a child of the killed CLI survived it"
    finally:
        cli.kill()
        for pid in filter(is_alive, children):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_full_disk_before_the_run_record_is_one_line(tmp_path, demo_checkpoint, monkeypatch, capsys):
    from pipeline.run import engine

    def disk_full(store, checkpoint_path):
        raise OSError(errno.ENOSPC, "No space left on device", str(store.checkpoints_dir))

    monkeypatch.setattr(engine, "snapshot_checkpoint", disk_full)
    code = main(["run", str(REPO_ROOT / "recipes" / "demo.yaml"), "--checkpoint", str(demo_checkpoint), "--store", str(tmp_path / "store")])
    err = optipipe_stderr(capsys.readouterr().err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert errors == [f"error: store {tmp_path / 'store'}: the run could not start (No space left on device); "
                      "free some space (optipipe gc) or pass --store on a writable disk"]
