"""Code digests: a stage's key covers the project modules it imports, and only their code, not comments."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from pipeline.run.code_digest import code_closure, code_digest, normalised_code

HELPER_SOURCE = '''"""Helpers shared by the stages."""

SCALE = 2


def double(value):
    """Twice ``value``, scaled."""
    return value * SCALE
'''

FAKE_PROJECT = {
    "pkg/__init__.py": '"""The fake project package."""\nNAME = "pkg"\n',
    "pkg/helper.py": HELPER_SOURCE,
    "pkg/stage_a.py": (
        "import numpy\n"
        "import torch\n"
        "from pkg import helper\n"
        "from pkg.helper import double\n"
        "from .sub import relative_only\n\n\n"
        "def run(value):\n"
        "    from pkg import lazy_only\n"
        "    return double(value) + helper.SCALE + lazy_only.OFFSET + relative_only.BASE\n"
    ),
    "pkg/stage_b.py": "import os\n\nVALUE = 3\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/relative_only.py": "from ..util import ONE\n\nBASE = ONE + 1\n",
    "pkg/util.py": "ONE = 1\n",
    "pkg/lazy_only.py": "OFFSET = 10\n",
}

STAGE_A_CLOSURE = [
    "pkg",
    "pkg.helper",
    "pkg.lazy_only",
    "pkg.stage_a",
    "pkg.sub",
    "pkg.sub.relative_only",
    "pkg.util",
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small fake project root holding the ``pkg`` package of FAKE_PROJECT."""
    for relative, text in FAKE_PROJECT.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return tmp_path


def edit(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its mtime a second on, so the per-file cache sees a new version."""
    previous_mtime_ns = path.stat().st_mtime_ns
    path.write_text(text)
    later_ns = previous_mtime_ns + 1_000_000_000
    os.utime(path, ns=(later_ns, later_ns))


@pytest.mark.parametrize(
    "edited_helper",
    [
        HELPER_SOURCE.replace("SCALE = 2\n", "SCALE = 2  # the factor every stage uses\n# another comment\n"),
        HELPER_SOURCE.replace('"""Helpers shared by the stages."""', '"""Reworded module docstring."""'),
        HELPER_SOURCE.replace("Twice ``value``, scaled.", "A different\n    function docstring."),
        HELPER_SOURCE.replace("\n\n\n", "\n\n\n\n\n"),
        HELPER_SOURCE.replace("return value * SCALE", "return (value*SCALE)"),
    ],
    ids=["comment", "module-docstring", "function-docstring", "blank-lines", "formatting"],
)
def test_comment_docstring_and_layout_edits_keep_the_digest(project: Path, edited_helper: str):
    before = code_digest("pkg.stage_a", [project])
    edit(project / "pkg/helper.py", edited_helper)
    assert code_digest("pkg.stage_a", [project]) == before


def test_a_code_change_in_a_helper_changes_only_its_importers(project: Path):
    stage_a_before = code_digest("pkg.stage_a", [project])
    stage_b_before = code_digest("pkg.stage_b", [project])
    edit(project / "pkg/helper.py", HELPER_SOURCE.replace("SCALE = 2", "SCALE = 3"))
    assert code_digest("pkg.stage_a", [project]) != stage_a_before
    assert code_digest("pkg.stage_b", [project]) == stage_b_before


def test_closure_lists_project_modules_only_and_imports_nothing(project: Path):
    closure = code_closure("pkg.stage_a", [project])
    assert list(closure) == STAGE_A_CLOSURE
    helper_code = normalised_code(HELPER_SOURCE)
    assert closure["pkg.helper"] == hashlib.sha256(helper_code.encode("utf-8")).hexdigest()
    assert list(code_closure("pkg.stage_b", [project])) == ["pkg", "pkg.stage_b"]
    assert not [name for name in sys.modules if name == "pkg" or name.startswith("pkg.")]


def test_relative_and_lazy_imports_are_followed(project: Path):
    before = code_digest("pkg.stage_a", [project])
    edit(project / "pkg/lazy_only.py", "OFFSET = 11\n")
    after_lazy_edit = code_digest("pkg.stage_a", [project])
    assert after_lazy_edit != before
    edit(project / "pkg/util.py", "ONE = 2\n")
    assert code_digest("pkg.stage_a", [project]) != after_lazy_edit
    relative_closure = code_closure("pkg.sub.relative_only", [project])
    assert list(relative_closure) == ["pkg", "pkg.sub", "pkg.sub.relative_only", "pkg.util"]


def test_a_syntax_error_in_a_project_file_names_the_file(project: Path):
    broken_helper = project / "pkg/helper.py"
    edit(broken_helper, "def double(value:\n    return value\n")
    with pytest.raises(SyntaxError) as raised:
        code_digest("pkg.stage_a", [project])
    assert raised.value.filename == str(broken_helper)


def test_docstring_only_bodies_normalise_to_pass():
    documented = 'class Spec:\n    """Only a docstring."""\n\n\ndef noop():\n    """Nothing."""\n'
    assert normalised_code(documented) == normalised_code("class Spec:\n    pass\n\ndef noop():\n    pass\n")
    assert normalised_code("LIMIT = 1\n") != normalised_code("LIMIT = 2\n")


def test_real_stage_closure_covers_torchkit_helpers_and_no_libraries():
    closure = code_closure("stages.fuse_conv_bn")
    assert "stages.fuse_conv_bn" in closure
    assert [name for name in closure if name.startswith("pipeline.torchkit.")]
    assert not [name for name in closure if name.startswith(("torch", "numpy", "pydantic"))]
