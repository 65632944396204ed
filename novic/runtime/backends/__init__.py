"""Runtime backends (torch-free): each one runs the bundle's graphs behind the same interfaces,
the DecoderSession protocol (novic.runtime.search) and an image encoder (pixels -> embeddings).

- ``ort``: onnxruntime on the CPU or with the CUDA provider (IOBinding);
- ``trt``: TensorRT engines;
- ``select``: which backend to use on this machine, and why.
Backend libraries (onnxruntime, tensorrt) are imported lazily, when a backend is built.
"""
