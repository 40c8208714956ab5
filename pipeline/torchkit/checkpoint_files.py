"""Checks that let ``load_checkpoint`` read a user's file without running what it carries or exhausting memory.

What each format gets (``allow_pickle`` is the recipe's statement that the file is trusted):

- safetensors: ``safetensors.load_file`` parses a JSON header and copies raw bytes; it evaluates nothing and
  refuses offsets past the end of the file, so it needs no check of ours.
- zip archives (torch.save, torch.export ``.pt2``, TorchScript): before any entry is read, each entry over
  ``INFLATION_FLOOR_BYTES`` may inflate to at most ``max_inflation`` times its compressed size, and all
  entries together to at most ``max_inflation`` times the file (plus the floor). torch writes them stored
  (1x), so only a zip bomb or a re-compressed file comes near the default limit of 20.
- torch.save (zip and pre-1.6 legacy): its pickle is first read by ``DeclarationReader``, a
  ``pickle.Unpickler`` whose globals are inert placeholders, so nothing from the file runs; it records
  each storage's declared size, which must not exceed the bytes the file holds for it. Then
  ``torch.load(weights_only=True)`` reads the file (unrestricted only with ``allow_pickle``). A pickle
  this lenient reader cannot parse is left to torch.load, whose weights-only reader is stricter and fails.
- ``.pt2``: ``torch.export.load`` evaluates the graph's shape strings with sympy (Python ``eval``), so it
  is called only with ``allow_pickle``. Otherwise only the weights are read: ``read_pt2_weights`` parses
  ``data/weights/model_weights_config.json`` and rebuilds each tensor from its raw entry with the
  recorded dtype, sizes, strides and offset; a size, stride or offset that is not a plain int (a
  symbolic expression) is refused, and so are pickled entries and the legacy ``model.pt`` weights file.
- TorchScript: ``torch.jit.load`` compiles and runs the archive's TorchScript code (``__setstate__``),
  so it is refused without ``allow_pickle``.
- every format: after loading, a tensor may not span more than ``max_inflation`` times the bytes of its
  storage (plus the floor): a stride-0 view of a few bytes must not turn into gigabytes in later stages.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.errors import CheckpointError

INFLATION_FLOOR_BYTES = 1 << 20  # small entries (JSON, pickles) compress well and cannot exhaust memory
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 torch.save file
STORAGE_ITEMSIZE = {name: dtype.itemsize for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
STORAGE_ITEMSIZE["UntypedStorage"] = 1
PT2_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
PT2_LEGACY_WEIGHTS = "data/weights/model.pt"
RAISE_LIMIT = "if the file is genuine, raise `with: {max_inflation: N}` on the load stage"
TRUST_FIX = "only for a file you trust, set `with: {allow_pickle: true}` on the load stage"


def archive_records(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by name inside the top folder that torch reads (the first entry's)."""
    infos = archive.infolist()
    top = infos[0].filename.partition("/")[0] if infos else ""
    return {info.filename.partition("/")[2]: info for info in infos if info.filename.partition("/")[0] == top}


def check_inflation(path: Path, archive: zipfile.ZipFile, max_inflation: float) -> None:
    """Refuse a zip whose entries inflate far past their compressed size or the file: read only its directory."""
    infos = archive.infolist()
    for info in infos:
        if info.file_size > INFLATION_FLOOR_BYTES and info.file_size > max_inflation * info.compress_size:
            raise CheckpointError(
                f"{path} was not loaded: its entry {info.filename} inflates from {info.compress_size} to "
                f"{info.file_size} bytes, over max_inflation {max_inflation:g}x (a zip bomb?); {RAISE_LIMIT}")
    total = sum(info.file_size for info in infos)
    if total > max_inflation * path.stat().st_size + INFLATION_FLOOR_BYTES:
        raise CheckpointError(
            f"{path} was not loaded: its entries inflate to {total} bytes from a {path.stat().st_size}-byte file, "
            f"over max_inflation {max_inflation:g}x (a zip bomb?); {RAISE_LIMIT}")


class Placeholder:
    """Stands for every object a pickle names or builds: accepts any call, item or state and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return Placeholder()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class DeclarationReader(pickle.Unpickler):
    """Reads one torch.save pickle without running anything, recording each storage's declared byte size."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storage_bytes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> type:
        """A fresh placeholder class for any global, remembering only which one the pickle named."""
        return type("Placeholder", (Placeholder,), {"pickled_name": name})

    def persistent_load(self, pid: Any) -> Placeholder:
        """Record ``('storage', type, key, location, numel, ...)`` references as key -> declared bytes."""
        if isinstance(pid, tuple) and pid[:1] == ("storage",):
            storage_type, key, numel = pid[1], str(pid[2]), pid[4]
            itemsize = STORAGE_ITEMSIZE.get(getattr(storage_type, "pickled_name", None))
            if itemsize is None or type(numel) is not int:
                raise pickle.UnpicklingError(f"unknown storage declaration {pid[:2]!r}")
            self.storage_bytes[key] = max(self.storage_bytes.get(key, 0), numel * itemsize)
        return Placeholder()


def declared_storage_bytes(file: IO[bytes]) -> dict[str, int] | None:
    """Storage key -> declared bytes of the pickle at the file's position; None if it does not parse."""
    reader = DeclarationReader(file)
    try:
        reader.load()
    except Exception:  # malformed: torch.load, stricter still, reports it
        return None
    return reader.storage_bytes


def storage_refused(path: Path, what: str, declared: int, held: int) -> CheckpointError:
    """The error for a checkpoint declaring more tensor bytes than it holds."""
    return CheckpointError(
        f"{path} was not loaded: it declares {declared} bytes of tensor data for {what} but holds only {held} bytes: "
        "a crafted or damaged checkpoint; re-save it with torch.save(model.state_dict(), path)")


def check_zip_storages(path: Path, archive: zipfile.ZipFile) -> None:
    """Each storage in a zip torch.save file must fit in its ``data/<key>`` entry, checked before torch allocates."""
    records = archive_records(archive)
    if "data.pkl" not in records:
        return  # not a torch.save archive: torch.load says so
    with archive.open(records["data.pkl"]) as pickled:
        declared = declared_storage_bytes(pickled) or {}
    for key, nbytes in declared.items():
        entry = records.get(f"data/{key}")
        held = entry.file_size if entry else 0
        if nbytes > held:
            raise storage_refused(path, f"storage '{key}'", nbytes, held)


def check_legacy_storages(path: Path) -> None:
    """A pre-1.6 torch.save file's storages together must fit in the file, checked before torch allocates."""
    with path.open("rb") as file:
        try:
            if DeclarationReader(file).load() != LEGACY_MAGIC_NUMBER:
                return  # not a legacy torch.save file: torch.load says what it is
            DeclarationReader(file).load()  # protocol version
            DeclarationReader(file).load()  # sys_info
        except Exception:
            return
        declared = declared_storage_bytes(file) or {}
    total, size = sum(declared.values()), path.stat().st_size
    if total > size:
        raise storage_refused(path, f"{len(declared)} storage(s)", total, size)


def check_view_extents(path: Path, state_dict: dict[str, torch.Tensor], max_inflation: float) -> None:
    """Refuse a tensor spanning far more bytes than its storage holds (a stride-0 view), before anything reads it."""
    for name, tensor in state_dict.items():
        if tensor.layout != torch.strided:
            continue
        spanned, stored = tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes()
        if spanned > max_inflation * stored + INFLATION_FLOOR_BYTES:
            raise CheckpointError(
                f"{path} was not loaded: tensor {name} spans {spanned} bytes over {stored} stored bytes, "
                f"over max_inflation {max_inflation:g}x (a crafted stride?); {RAISE_LIMIT}")


def pt2_unreadable(path: Path, reason: str) -> CheckpointError:
    """The error for a ``.pt2`` whose weights cannot be read without torch.export.load."""
    return CheckpointError(f"{path}: the weights of this torch.export archive cannot be read safely ({reason}); "
                           f"re-export it with torch.export.save, or {TRUST_FIX}")


def plain_int(path: Path, fqn: str, value: Any) -> int:
    """A serialized SymInt that must be ``{"as_int": n}``; an expression (code sympy would evaluate) is refused."""
    if isinstance(value, dict) and set(value) == {"as_int"} and type(value["as_int"]) is int:
        return value["as_int"]
    shown = json.dumps(value)[:80]
    raise CheckpointError(
        f"{path} was not loaded: tensor {fqn} has a symbolic size or stride ({shown}), and evaluating it would run "
        f"code from the file; torch.export.save writes plain integers there, so the file is crafted or damaged. "
        f"Re-export it, or {TRUST_FIX}")


def pt2_tensor(path: Path, fqn: str, meta: dict[str, Any], storage: torch.Tensor) -> torch.Tensor:
    """One weight as a view of its raw storage, with the sizes, strides and offset the config records."""
    sizes = [plain_int(path, fqn, size) for size in meta["sizes"]]
    strides = [plain_int(path, fqn, stride) for stride in meta["strides"]]
    offset = plain_int(path, fqn, meta["storage_offset"])
    if any(number < 0 for number in (*sizes, *strides, offset)):
        raise pt2_unreadable(path, f"tensor {fqn} has a negative size, stride or offset")
    return torch.as_strided(storage, sizes, strides, offset)  # RuntimeError when the view overruns the storage


def pt2_dtype(code: Any) -> torch.dtype:
    """The torch dtype of a serialized ScalarType number."""
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    return _SERIALIZE_TO_TORCH_DTYPE[ScalarType(code)]


def read_pt2_weights(path: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """The state_dict of a torch.export ``.pt2`` from its weights config and raw entries, evaluating nothing."""
    from torch._export.serde.schema import Layout

    records = archive_records(archive)
    if PT2_WEIGHTS_CONFIG not in records:
        found = "only a legacy pickled weights file" if PT2_LEGACY_WEIGHTS in records else "no weights config"
        raise pt2_unreadable(path, found)
    byteorder = archive.read(records["byteorder"]).strip() if "byteorder" in records else b"little"
    if byteorder != b"little":
        raise pt2_unreadable(path, f"weights in {byteorder.decode(errors='replace')[:20]!r} byte order")
    storages: dict[tuple[str, torch.dtype], torch.Tensor] = {}
    state_dict = {}
    try:
        config = json.loads(archive.read(records[PT2_WEIGHTS_CONFIG]))["config"]
        for fqn, entry in config.items():
            meta = entry["tensor_meta"]
            if entry.get("use_pickle") or meta["layout"] != Layout.Strided.value:
                raise pt2_unreadable(path, f"tensor {fqn} is pickled or not a dense tensor")
            dtype = pt2_dtype(meta["dtype"])
            if (entry["path_name"], dtype) not in storages:
                raw = bytearray(archive.read(records[f"data/weights/{entry['path_name']}"]))
                storages[entry["path_name"], dtype] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            state_dict[fqn] = pt2_tensor(path, fqn, meta, storages[entry["path_name"], dtype])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:  # missing fields or entries, bad views
        raise pt2_unreadable(path, f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}") from None
    return state_dict
