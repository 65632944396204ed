#!/usr/bin/env bash
# Here (with PyPI): fetch what bench/gpu_check.sh carries to the device, into .gpu/ (git-ignored
# via .git/info/exclude). onnxruntime-gpu (255 MB) is repacked with xz and split into 4 parts of
# < 64 MiB, one per device call (a, b, c, d), each copied to /tmp/ortp there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl .gpu/src
pyver="--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
python3 -m pip download -q --no-deps $pyver -d .gpu/whl open_clip_torch==3.3.0 ftfy wcwidth \
  nvidia-nvimgcodec-cu13==0.9.0.20 "nvidia-nvjpeg>=13,<14"   # GPU JPEG decoding (novic.runtime.nvjpeg)
python3 -m pip download -q --no-deps $pyver -d .gpu/src onnxruntime-gpu==1.31.1
rm -rf .gpu/tree && mkdir .gpu/tree && (cd .gpu/tree && unzip -q ../src/onnxruntime_gpu-*.whl)
rm -f .gpu/tree/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
tar -C .gpu/tree -cf - . | xz -T2 -6 > .gpu/ortgpu.tar.xz
rm -rf .gpu/tree .gpu/a .gpu/b .gpu/c .gpu/d && mkdir -p .gpu/a .gpu/b .gpu/c .gpu/d
(cd .gpu && split -n 4 -d ortgpu.tar.xz part && mv part00 a/ && mv part01 b/ && mv part02 c/ && mv part03 d/)
du -sh .gpu/*
