"""ONNX graphs whose weights live in external files (towers over ~1 GiB: ViT-H, SO400M).

Quantisers name their weight files in their own ways (onnxruntime: ``<graph>.data`` or one file
per tensor; ModelOpt: its own suffix). Before a quantised graph enters a bundle it is rewritten
with all its weights in one file, ``<graph name>.data``, so that the bundle's files are
predictable and listed in the manifest like the exporter's.
"""
from __future__ import annotations

from pathlib import Path


def external_files(graph) -> list[Path]:
    """The external weight files a graph refers to (absolute paths), without loading them."""
    import onnx

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    found = set()
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in t.external_data}["location"]
            found.add((graph.parent / location).resolve())
    return sorted(found)


def one_weight_file(graph) -> list[Path]:
    """Rewrite `graph` so that its external weights (if any) are in one file next to it named
    ``<graph name>.data``; -> [that file], or [] for a self-contained graph."""
    import onnx

    graph = Path(graph)
    old = external_files(graph)
    data = graph.with_name(graph.name + ".data")
    if old in ([], [data.resolve()]):   # self-contained, or already in that form
        return [data] if old else []
    model = onnx.load(str(graph))               # the weights are in memory from here on
    for f in old:
        f.unlink()                               # onnx appends to an existing weight file
    onnx.save(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)
    return [data]
