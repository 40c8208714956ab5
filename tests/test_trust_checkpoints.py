"""Hostile checkpoints: loading one must run nothing it carries, and a bomb is refused before memory is spent.

Every hostile file is built here. The bombs are loaded in one fresh subprocess that records, per file, the
error line and how far its peak RSS rose (``ru_maxrss`` is a high-water mark, so only a fresh process
measures it); its address space is capped so that a regression fails instead of exhausting the machine.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.zoo import digits_cnn
from tests.conftest import REPO_ROOT
from tests.test_load_checkpoint import assert_same_outputs, load

GIB = 1 << 30
RSS_LIMIT_MB = 200


@pytest.fixture
def source_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return digits_cnn().eval()


def rewrite_zip(source: Path, target: Path, replace: dict) -> Path:
    """A copy of the zip ``source`` where an entry whose inner name is in ``replace`` gets new bytes or a writer."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", compresslevel=1) as copy:
        for item in original.infolist():
            new = replace.get(item.filename.partition("/")[2])
            if callable(new):
                new(copy, item.filename)
            else:
                copy.writestr(item, original.read(item) if new is None else new)
    return target


def touch_expression(marker: Path, expression: str) -> str:
    """A sympy shape string that creates ``marker`` when evaluated, then stands for ``expression``."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch() or {expression}"


def inject_expressions(node, marker: Path) -> None:
    """Make every ``expr_str`` in a serialized ExportedProgram create ``marker`` when torch parses it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr_str":
                node[key] = touch_expression(marker, value)
            else:
                inject_expressions(value, marker)
    elif isinstance(node, list):
        for value in node:
            inject_expressions(value, marker)


def test_export_graph_expression_never_runs(tmp_path, source_model):
    """Weights load from a .pt2 whose graph runs code on torch.export.load, and that code never runs."""
    marker = tmp_path / "pwned"
    clean = tmp_path / "dynamic.pt2"
    batch = torch.export.Dim("batch", min=2, max=64)
    torch.export.save(torch.export.export(source_model, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: batch},)), clean)
    with zipfile.ZipFile(clean) as archive:
        graph_name = next(name for name in archive.namelist() if name.endswith("models/model.json"))
        graph = json.loads(archive.read(graph_name))
    inject_expressions(graph, marker)
    path = rewrite_zip(clean, tmp_path / "evil.pt2", {"models/model.json": json.dumps(graph)})
    output = load(tmp_path, path)
    assert output.metrics["format"] == "torch_export"
    assert_same_outputs(output, source_model)
    assert not marker.exists()
    with path.open("rb") as file:  # the file is truly hostile: torch's own loader runs its code
        torch.export.load(file)
    assert marker.exists()


def test_export_symbolic_weight_size_is_refused(tmp_path, source_model):
    marker = tmp_path / "pwned"
    clean = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(source_model, (torch.randn(1, 1, 8, 8),)), clean)
    with zipfile.ZipFile(clean) as archive:
        config_name = next(name for name in archive.namelist() if name.endswith("model_weights_config.json"))
        config = json.loads(archive.read(config_name))
    first = next(iter(config["config"].values()))["tensor_meta"]
    first["sizes"][0] = {"as_expr": {"expr_str": touch_expression(marker, "32"), "hint": {"as_int": 32}}}
    path = rewrite_zip(clean, tmp_path / "evil.pt2", {"data/weights/model_weights_config.json": json.dumps(config)})
    with pytest.raises(CheckpointError, match="symbolic size or stride") as caught:
        load(tmp_path, path)
    assert "\n" not in str(caught.value) and "allow_pickle: true" in str(caught.value)
    assert not marker.exists()


class PrintsOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (TorchScript code, run by torch.jit.load) prints a marker."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        return x + 1

    @torch.jit.export
    def __getstate__(self):
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.marker = state[0]
        self.training = state[1]
        print(self.marker)


def test_torchscript_refused_without_opt_in(tmp_path, capfd):
    """TorchScript can print but not touch files, so its marker is a line it would print when loaded."""
    marker = "TORCHSCRIPT-FROM-THE-FILE-RAN"
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(PrintsOnLoad(marker)), str(path))
    capfd.readouterr()
    with pytest.raises(CheckpointError, match="TorchScript archive") as caught:
        load(tmp_path, path)
    assert "torch.save(model.state_dict(), path)" in str(caught.value) and "\n" not in str(caught.value)
    assert marker not in capfd.readouterr().out
    torch.jit.load(str(path))  # the file is truly hostile: torch.jit.load runs its code
    assert marker in capfd.readouterr().out


# --- bombs --------------------------------------------------------------------------------------------------


class DeclaredStorage:
    """Pickled by ``DeclaringPickler`` as a float storage of ``numel`` elements whose bytes live elsewhere."""

    def __init__(self, numel: int):
        self.numel = numel


class DeclaredTensor:
    """Unpickles as a 1-D float tensor over a ``DeclaredStorage``."""

    def __init__(self, numel: int):
        self.storage = DeclaredStorage(numel)

    def __reduce__(self):
        numel = self.storage.numel
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (numel,), (1,), False, collections.OrderedDict())


def declaring_pickle(numel: int, legacy: bool) -> bytes:
    """torch.save's pickle of ``{"weight": tensor}`` whose storage declares ``numel`` floats."""

    class DeclaringPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, DeclaredStorage):
                return None
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) + ((None,) if legacy else ())

    buffer = io.BytesIO()
    DeclaringPickler(buffer, protocol=2).dump({"weight": DeclaredTensor(numel)})
    return buffer.getvalue()


def zip_template(tmp: Path) -> Path:
    path = tmp / "template.pt"
    torch.save({"weight": torch.zeros(4)}, path)
    return path


def zip_storage_bomb(tmp: Path) -> Path:
    """234 kB of data under a storage declared as 2^28 floats (1 GiB)."""
    replace = {"data.pkl": declaring_pickle(GIB // 4, legacy=False), "data/0": bytes(234_000)}
    return rewrite_zip(zip_template(tmp), tmp / "storage-bomb.pt", replace)


def legacy_storage_bomb(tmp: Path) -> Path:
    """The pre-1.6 torch.save layout (magic, protocol, sys_info, pickle, keys, raw storage): 234 kB for 1 GiB."""
    held = 234_000
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps(sys_info, protocol=2), declaring_pickle(GIB // 4, legacy=True), pickle.dumps(["0"], protocol=2),
             (held // 4).to_bytes(8, "little"), bytes(held)]
    path = tmp / "legacy-bomb.pt"
    path.write_bytes(b"".join(parts))
    return path


def write_deflated_zeros(copy: zipfile.ZipFile, name: str, nbytes: int = GIB) -> None:
    """A deflated entry of ``nbytes`` zero bytes: about a thousandth of that in the file."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(1 << 24)
    with copy.open(info, "w", force_zip64=True) as entry:
        for _ in range(nbytes // len(chunk)):
            entry.write(chunk)


def zip_deflate_bomb(tmp: Path) -> Path:
    """A torch.save zip whose 1 GiB storage entry is deflated into about 1 MB, declared consistently."""
    replace = {"data.pkl": declaring_pickle(GIB // 4, legacy=False), "data/0": write_deflated_zeros}
    return rewrite_zip(zip_template(tmp), tmp / "deflate-bomb.pt", replace)


def pt2_deflate_bomb(tmp: Path) -> Path:
    """A torch.export archive whose first weight entry inflates to 1 GiB."""
    clean = tmp / "clean.pt2"
    torch.export.save(torch.export.export(digits_cnn().eval(), (torch.randn(1, 1, 8, 8),)), clean)
    return rewrite_zip(clean, tmp / "deflate-bomb.pt2", {"data/weights/weight_0": write_deflated_zeros})


def stride_bomb(tmp: Path) -> Path:
    """A 4-byte storage viewed with stride 0 as 2^28 floats: 1 GiB for the first stage that reads it."""
    path = tmp / "stride-bomb.pt"
    torch.save({"classifier.weight": torch.zeros(1).expand(GIB // 4)}, path)
    return path


BOMBS = {  # builder, a substring of the one-line refusal
    "zip-storage": (zip_storage_bomb, "declares 1073741824 bytes of tensor data for storage '0' but holds only 234000"),
    "legacy-storage": (legacy_storage_bomb, "declares 1073741824 bytes of tensor data"),
    "zip-deflate": (zip_deflate_bomb, "inflates from"),
    "pt2-deflate": (pt2_deflate_bomb, "inflates from"),
    "stride": (stride_bomb, "spans 1073741824 bytes over 4 stored bytes"),
}

LOAD_EACH = """
import json, resource, sys
from pathlib import Path
from stages import load_checkpoint
from tests.test_load_checkpoint import make_context
tmp, good, bombs = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
pages = int(Path("/proc/self/statm").read_text().split()[0])
resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + 3 * (1 << 30), resource.RLIM_INFINITY))
load_checkpoint.run(make_context(tmp, good), {}, load_checkpoint.Params())  # imports and model in the baseline
results = {}
for case, path in bombs.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_checkpoint.run(make_context(tmp, Path(path)), {}, load_checkpoint.Params())
        error = None
    except Exception as caught:
        error = f"{type(caught).__name__}: {caught}"
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    results[case] = {"error": error, "rss_growth_mb": grown}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory) -> dict:
    """Each bomb's error and peak-RSS growth when loaded, all in one fresh subprocess."""
    tmp = tmp_path_factory.mktemp("bombs")
    paths = {case: str(build(tmp)) for case, (build, _) in BOMBS.items()}
    good = tmp / "good.pt"
    torch.save(digits_cnn().state_dict(), good)
    done = subprocess.run([sys.executable, "-c", LOAD_EACH, str(tmp), str(good), json.dumps(paths)],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(BOMBS))
def test_bomb_refused_in_bounded_memory(bomb_results, case):
    result = bomb_results[case]
    print(f"[{case}] rss +{result['rss_growth_mb']:.0f} MB: {result['error']}")
    assert result["error"] is not None and result["error"].startswith("CheckpointError: "), result
    assert BOMBS[case][1] in result["error"] and "\n" not in result["error"]
    assert result["rss_growth_mb"] < RSS_LIMIT_MB, result
