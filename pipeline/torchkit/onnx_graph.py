"""Facts of an ONNX graph that stages name layers and report by: each node's torch module path, stable positions, op counts.

The dynamo exporter records each node's torch module scope in its metadata (``pkg.torch.onnx.name_scopes``), and
``stages/export_onnx.py`` keeps it through onnxsim; a node's position among the nodes of its op type (``Conv#2``)
does not depend on the exporter's generated node names. Reads files optipipe exported; imports no torch.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import onnx

from pipeline.torchkit.sensitivity import Layer, numbered


def module_path(node: onnx.NodeProto) -> str | None:
    """The torch module the dynamo exporter made ``node`` from (its ``pkg.torch.onnx.name_scopes`` metadata), or None.

    The scopes run from the root to the op (``['', 'module', 'module.features', ..., 'relu_1']``, or flattened
    ``['', 'module.features.0.0', 'conv2d']`` for an fx GraphModule); the last module scope is the path, without
    the ``module.`` of export_onnx's wrapper. A Conv with a BatchNorm folded into
    it by the exporter carries the BatchNorm's scope (``features.0.1``), a sibling of the conv's.
    """
    metadata = {entry.key: entry.value for entry in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" not in metadata:
        return None
    scopes = ast.literal_eval(metadata["pkg.torch.onnx.name_scopes"])
    classes = ast.literal_eval(metadata.get("pkg.torch.onnx.class_hierarchy", "[]"))
    path = scopes[-2] if len(scopes) >= 2 else ""
    if classes and classes[0].endswith("export_onnx.ExportedForward"):  # the wrapper holds the model as `module`
        path = "" if path == "module" else path.removeprefix("module.")
    return path or None


def graph_nodes(path: Path) -> list[Layer]:
    """Every node of an ONNX file in topological order: name, op type, position (``Conv#3``) and torch module path."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return numbered((node.name, node.op_type, module_path(node)) for node in graph.node)


def op_counts(path: Path) -> dict[str, int]:
    """Nodes of each op type in an ONNX file, most frequent first."""
    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node).most_common())
