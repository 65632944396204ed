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
# Pinned: the set this script was tested with (CI runs the ModelOpt tests with it).
"$dir/bin/pip" install -q --disable-pip-version-check --no-deps \
  nvidia-modelopt==0.47.0 onnx==1.21.0 onnxruntime==1.24.4 onnx_graphsurgeon==0.6.1 onnxconverter-common==1.16.0 \
  onnxslim==0.1.98 onnxscript==0.7.2 onnx-ir==1.1.0 ml_dtypes==0.6.0 polygraphy==0.53.6 PuLP==3.3.2 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 omegaconf==2.4.0 \
  PyYAML==6.0.4 nvidia-ml-py==13.615.71 numpy==2.4.6 flatbuffers==25.12.19 protobuf==7.36.2 packaging==26.4 \
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0 tqdm==4.70.1 scipy==1.17.1 regex==2026.11.19 \
  safetensors==0.8.0 typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.4.1 ninja==1.13.2 lief==1.0.0 \
  cppimport==26.4.17 pybind11==3.1.0 Mako==1.4.3 coloredlogs==15.0.1 humanfriendly==10.0

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
