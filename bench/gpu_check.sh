#!/usr/bin/env bash
# The GPU check, for ONE device call (see docs/benchmarks.md "GPU"; what it measures that no GPU
# run has yet: "GPU: prepared since run 2"). Ends with one summary table ($OUT/summary.md): tokens
# vs the CPU oracle, phases at batch 1, host work per decoder call, throughput from pixels / photos /
# JPEG bytes, ratios to the PyTorch peer (torch.compile) and the original-style pipeline, GPU
# memory, GPU name. Rehearsed on the CPU by `python bench/gpu_check.py --cpu-smoke` (a test runs it);
# to fit a short device budget: --precisions fp16 --skip serving,decoder_rows. The device image has torch,
# onnx and onnxruntime (CPU) but no open_clip and no onnxruntime-gpu, and reaches no registry, so
# they are carried: .gpu/whl/*.whl (open_clip, ftfy, wcwidth) and onnxruntime-gpu as an xz'd tree
# split in parts that earlier calls left in /tmp/ortp (bench/gpu_prepare.sh makes them here).
set -u
OUT=${OUT:-/tmp/gpu_out}
STAGE=/tmp/novic_gpu
mkdir -p "$STAGE/site" "$STAGE/ort" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" .gpu/whl/*.whl || exit 1
# nvImageCodec's wheel makes `nvidia` a regular package; keep it a namespace shared with torch's nvidia-* libs
rm -f "$STAGE/site/nvidia/__init__.py"
if [ ! -f "$STAGE/ort/onnxruntime/__init__.py" ]; then
  cat /tmp/ortp/part0* | xz -d | tar -x -C "$STAGE/ort" || { echo "onnxruntime-gpu parts missing"; exit 1; }
fi
export PYTHONPATH="$STAGE/ort:$STAGE/site:$PWD"
# onnxruntime-gpu finds CUDA 13 / cuDNN in the nvidia-* wheels that torch installed.
SP=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
export LD_LIBRARY_PATH="$(find "$SP/nvidia" "$STAGE/site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
