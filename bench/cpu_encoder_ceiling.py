"""How close is the fp32 image encoder on onnxruntime-CPU to what this machine can do?

Three measurements in one process, on the bundle that `bench/cpu_rounds.py` builds:
1. the ceiling: onnxruntime running a lone MatMul of each shape the encoder multiplies
   (GFLOP/s of the best one is the most any fp32 encoder can reach here);
2. the encoder: whole-graph median time and its GFLOP/s (FLOPs counted from the graph's
   MatMul/Gemm/Conv nodes with inferred shapes);
3. where its time goes: onnxruntime's profiler, summed per op type.

    python bench/cpu_encoder_ceiling.py [--config paper] [--reps 10]

Prints a table; the record is in docs/benchmarks.md ("CPU: the fp32 encoder's ceiling").
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from novic.bench.setup import CONFIGS, build
from novic.runtime.backends.ort import make_session


def median_ms(run, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def matmul_flops(model: onnx.ModelProto) -> tuple[float, list[tuple[int, int, int]]]:
    """FLOPs of the graph's MatMul/Gemm/Conv nodes at batch 1, and the distinct (M, K, N) shapes."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total, mkn = 0.0, set()
    for node in inferred.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not a or not b:
                continue
            m, k = int(np.prod(a[:-1])), a[-1]
            n = b[-1] if node.op_type == "MatMul" or not any(
                at.name == "transB" and at.i for at in node.attribute) else b[0]
            total += 2.0 * m * k * n     # attention's batched matmuls: heads are folded into m
            if len(b) == 2:
                mkn.add((m, k, n))
        elif node.op_type == "Conv":
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and y:
                total += 2.0 * np.prod(y) * np.prod(w[1:])
    return total, sorted(mkn)


def lone_matmul(m: int, k: int, n: int, path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def torch_matmul(m: int, k: int, n: int, reps: int) -> str:
    """The same product in torch (the baseline's library), for comparison; empty without torch."""
    try:
        import torch
    except ImportError:
        return ""
    torch.set_num_threads(os.cpu_count())
    x, w = torch.randn(m, k), torch.randn(k, n)
    ms = median_ms(lambda: x @ w, reps=max(reps, 20))
    return f"   (torch: {2.0 * m * k * n / ms / 1e6:6.1f} GFLOP/s)"


def profile_by_op(encoder: Path, feed: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Mean ms per run spent in each op type, from onnxruntime's own profiler (warm-up runs left out)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "enc")
        session = ort.InferenceSession(str(encoder), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + reps):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    start = runs[warmup]
    per_op = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / reps
    return dict(per_op)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    a = ap.parse_args()
    paths = build(CONFIGS[a.config], Path(a.workdir) / a.config)
    encoder = Path(paths["bundle"]) / "image_encoder.onnx"
    model = onnx.load(str(encoder), load_external_data=False)
    flops, shapes = matmul_flops(model)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; onnxruntime {ort.__version__}")

    print("\nceiling: a lone fp32 MatMul per encoder shape (onnxruntime, same session options)")
    best = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in shapes:
            s = make_session(lone_matmul(m, k, n, Path(tmp) / f"mm{m}_{k}_{n}.onnx"), "cpu")
            x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
            ms = median_ms(lambda: s.run(None, {"x": x}), reps=max(a.reps, 20))
            gflops = 2.0 * m * k * n / ms / 1e6
            best = max(best, gflops)
            print(f"  [{m}x{k}] @ [{k}x{n}]: {ms:7.3f} ms  {gflops:6.1f} GFLOP/s{torch_matmul(m, k, n, a.reps)}")

    session = make_session(encoder, "cpu")
    inp = session.get_inputs()[0]
    size = [d if isinstance(d, int) else 1 for d in inp.shape]
    feed = {inp.name: np.random.default_rng(2).standard_normal(size, dtype=np.float32)}
    ms = median_ms(lambda: session.run(None, feed), reps=a.reps)
    achieved = flops / ms / 1e6
    print(f"\nencoder ({a.config}, batch 1): {flops / 1e9:.1f} GFLOP in MatMul/Gemm/Conv, {ms:.1f} ms median "
          f"= {achieved:.0f} GFLOP/s, {achieved / best:.0%} of the best lone MatMul ({best:.0f} GFLOP/s)")
    print(f"  floor at the ceiling: {flops / best / 1e6:.1f} ms if every FLOP ran at the best MatMul's rate "
          f"and every other op were free")

    per_op = profile_by_op(encoder, feed, reps=a.reps)
    total = sum(per_op.values())
    print(f"\nwhere the time goes (onnxruntime profiler, {total:.1f} ms of kernel time per run):")
    for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {op:28s} {t:7.2f} ms  {t / total:5.1%}")


if __name__ == "__main__":
    main()
