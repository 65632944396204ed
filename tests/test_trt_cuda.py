"""The trt backend's thin CUDA layer (novic.runtime.backends.trt.Cuda) against the real
cuda-bindings. The TensorRT tests replace this layer with a fake; here the real calls run: without
a GPU the error path (CUDA's own error objects turned into one line), with a GPU a round trip
through device memory on a stream."""
import re

import numpy as np
import pytest

cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is in the dev extra")

from novic.runtime.backends.trt import Cuda, TrtError  # noqa: E402


def test_stream_handle_is_the_int_tensorrt_takes(monkeypatch):
    assert Cuda.handle(cudart.cudaStream_t(7)) == 7
    assert Cuda.handle(cudart.cudaStream_t(0)) == 0
    # through cuda-bindings' own converter, not the deprecated int(cudaStream_t)
    import cuda.bindings.utils as utils

    monkeypatch.setattr(utils, "get_cuda_native_handle", lambda stream: 12345)
    assert Cuda.handle(cudart.cudaStream_t(7)) == 12345


def test_cuda_layer_on_this_machine():
    try:
        cuda = Cuda(0)
    except TrtError as exc:
        # No GPU or driver (CI): one line naming the call and CUDA's error by name and number.
        assert re.fullmatch(r"CUDA cudaSetDevice\(0\) failed: cudaError\w+ \(\d+\)", str(exc)), str(exc)
        return
    name, cc = cuda.device_properties()
    assert name and re.fullmatch(r"\d+\.\d+", cc)
    stream = cuda.stream()
    data = np.arange(1000, dtype=np.float32)
    src, dst = cuda.malloc_host(data.nbytes, np.float32), cuda.malloc_host(data.nbytes, np.float32)
    ptr = cuda.malloc(data.nbytes)
    try:
        src[:] = data
        cuda.h2d(ptr, src, data.nbytes, stream)
        cuda.d2h(dst, ptr, data.nbytes, stream)
        cuda.sync(stream)
        assert np.array_equal(dst, data)
        with pytest.raises(TrtError, match=r"^CUDA cudaMalloc\(\d+\) failed: cudaErrorMemoryAllocation"):
            cuda.malloc(1 << 62)
    finally:
        cuda.free(ptr)
        cuda.free_host(src)
        cuda.free_host(dst)
        cuda.rt.cudaStreamDestroy(stream)
