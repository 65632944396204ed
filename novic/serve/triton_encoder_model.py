"""Triton Python-backend model `novic_image_encoder`, for servers without the onnxruntime backend.

`novic-export triton --encoder-backend python` copies this file into the repository as
`novic_image_encoder/1/model.py` in place of the onnxruntime-backend configuration: the same
inputs and outputs, the same graph (model.onnx), run by novic's onnxruntime wrapper inside the
Python backend. For Triton builds that ship only the Python backend (PyTriton's wheel, for one);
where the onnxruntime backend exists, the default repository uses it (no Python in the hot path).
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from novic.runtime.backends.ort import OrtImageEncoder

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        provider = "cuda" if args["model_instance_kind"] == "GPU" else "cpu"
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.encoder = OrtImageEncoder(path, provider=provider, device_id=int(args["model_instance_device_id"]))

    def execute(self, requests):
        # One encoder call for the whole dynamic batch, split back per request.
        pixels = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        embeds = self.encoder(np.concatenate(pixels))
        bounds = np.cumsum([len(p) for p in pixels])[:-1]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)])
                for part in np.split(embeds, bounds)]

    def finalize(self):
        close = getattr(self.encoder, "close", None)
        if callable(close):
            close()
