"""Post-training quantisation with accuracy gates (issue 8).

- ``data``: calibration + held-out images (a user folder or the built-in scikit-image set),
  preprocessed like the runtime does;
- ``ort_int8``: onnxruntime-CPU INT8 variants (dynamic MatMul, or static QDQ, symmetric);
- ``gates``: embedding cosine and top-1 label agreement vs fp32 on held-out images;
- ``run``: ``novic-export calib`` -- quantise, gate, and add ``image_encoder.int8.onnx`` to a bundle;
- ``modelopt``: TensorRT-style INT8/FP8 Q/DQ through NVIDIA ModelOpt in a separate venv.
"""
