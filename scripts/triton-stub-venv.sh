#!/usr/bin/env bash
# The Python environment that Triton's Python-backend stub runs in (novic.serve.triton and the
# Python-backend models of `novic-export triton`), for novic environments with numpy >= 2.
#
#   bash scripts/triton-stub-venv.sh DIR [PYTHON]
#
# Why: the stub bundled with nvidia-pytriton 0.7 (and Triton's python backend of the same
# release) is compiled against numpy 1; under numpy 2 every output tensor it sends back is empty.
# nvidia-pytriton pins numpy<2, so a fresh `pip install 'novic[triton]'` gets numpy 1 and needs no
# stub venv; an environment that must keep numpy 2 (e.g. for pandas) points the stub at DIR
# instead: `NOVIC_TRITON_STUB_ENV=DIR` or `serve(..., stub_env=DIR)`. With DIR = .triton-stub-venv
# (in the repository) the tests find it by themselves.
#
# DIR gets the base interpreter of PYTHON (default `python`; the stub is built per Python minor
# version, so it must match), numpy 1, pyzmq (PyTriton's proxy) and novic's torch-free runtime
# (onnxruntime, Pillow, this checkout through a .pth file) for the exported repository's models.
set -euo pipefail
dir=${1:?usage: bash scripts/triton-stub-venv.sh DIR [PYTHON]}
python=${2:-python}
root="$(cd "$(dirname "$0")/.." && pwd)"

"$python" -m venv --clear "$dir"
"$dir/bin/pip" install -q --disable-pip-version-check "numpy==1.26.4" "pyzmq>=23" "onnxruntime>=1.18" "pillow>=10"
site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root" > "$site/novic-checkout.pth"
"$dir/bin/python" -c "import numpy, zmq, onnxruntime, novic.runtime.search; print('triton stub venv ok: numpy', numpy.__version__)"
