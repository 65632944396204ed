#!/usr/bin/env bash
# A separate venv for NVIDIA ModelOpt's ONNX quantisation (novic-export calib --method modelopt-int8|modelopt-fp8).
#
#   bash scripts/modelopt-venv.sh DIR [PYTHON]
#
# With DIR = .modelopt-venv (in the repository) the tests find it by themselves (tests/conftest.py).
#
# nvidia-modelopt[onnx] pulls onnxruntime-gpu and an older onnx, which would break novic's own
# environment, so it gets its own venv with its ONNX dependencies installed by name, without their
# CUDA extras. modelopt.onnx imports torch: rather than download torch again, the venv borrows it
# from PYTHON (default: `python`, the interpreter of your novic [export] environment) through links
# listed in a .pth file, after the venv's own packages (so the venv's onnx/onnxruntime win).
set -euo pipefail
dir=${1:?usage: bash scripts/modelopt-venv.sh DIR [PYTHON]}
python=${2:-python}
"$python" -c "import torch" 2>/dev/null || {
  echo "error: $python cannot import torch; pass the python of your novic [export] environment as PYTHON" >&2; exit 2; }

"$python" -m venv "$dir"
"$dir/bin/pip" install -q --disable-pip-version-check --no-deps \
  nvidia-modelopt==0.47.0 onnx==1.21.0 onnxruntime==1.24.4 onnx_graphsurgeon onnxconverter-common onnxslim \
  onnxscript onnx-ir ml_dtypes polygraphy PuLP pydantic pydantic_core annotated-types typing-inspection \
  omegaconf PyYAML nvidia-ml-py numpy flatbuffers protobuf packaging rich markdown-it-py mdurl pygments tqdm \
  scipy regex safetensors typing_extensions sympy mpmath ninja lief cppimport pybind11 Mako coloredlogs humanfriendly

borrowed="$(cd "$dir" && pwd)/borrowed-torch"
mkdir -p "$borrowed"
"$python" - "$borrowed" <<'PY'
import importlib, importlib.metadata, pathlib, sys
dst = pathlib.Path(sys.argv[1])
links = [pathlib.Path(importlib.import_module(m).__file__).parent
         for m in ("torch", "torchgen", "functorch", "filelock", "fsspec", "jinja2", "markupsafe", "networkx")]
links.append(pathlib.Path(importlib.metadata.distribution("torch")._path))   # torch's dist-info (version lookups)
for src in links:
    link = dst / src.name
    if not link.exists():
        link.symlink_to(src)
PY
site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$borrowed" > "$site/zz_novic_borrowed_torch.pth"
"$dir/bin/python" -c "import modelopt, modelopt.onnx.quantization; print('ModelOpt', modelopt.__version__, 'ready:', '$dir/bin/python')"
