"""Triton Python-backend model `novic` of a repository written by `novic-export triton`.

This file is copied into the repository as `novic/1/model.py`; Triton's Python backend runs it in
its stub process, whose Python must have novic's runtime installed (`pip install 'novic[cpu]'`).
Per dynamic batch of requests: decode and preprocess the images (novic's Preprocessor), encode
them with one request to the `novic_image_encoder` model (Triton's onnxruntime backend, on the GPU
for a GPU repository; BLS = a model calling another model inside the server), then one beam search
over the decoder graphs with onnxruntime in this process. Inputs and outputs:
novic.serve.triton_requests.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class EncoderModel:
    """The image encoder as a Triton model called from here (pixels -> embeddings, float32)."""

    def __init__(self, name: str, input_name: str, output_name: str, dtype: str):
        self.name, self.input_name, self.output_name = name, input_name, output_name
        self.dtype = np.dtype(dtype)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.name, requested_output_names=[self.output_name],
            inputs=[pb_utils.Tensor(self.input_name, np.ascontiguousarray(pixels, dtype=self.dtype))])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"Triton model {self.name}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, self.output_name).as_numpy().astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        from novic.runtime.backends.ort import OrtDecoderSession
        from novic.runtime.bundle import Bundle
        from novic.runtime.classifier import Classifier

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = Bundle.open(Path(args["model_repository"]) / args["model_version"] / "bundle")
        precision, provider = params["decoder_precision"], params["decoder_provider"]
        decoder = OrtDecoderSession(bundle.artifact_path("decoder_prefill", precision),
                                    bundle.artifact_path("decoder_step", precision), bundle.decoder_config,
                                    provider=provider)
        encoder = EncoderModel(params["encoder_model"], params["encoder_input"], params["encoder_output"],
                               params["encoder_dtype"])
        reason = (f"image encoder: Triton model {params['encoder_model']}; decoder: onnxruntime "
                  f"({provider}) in the Python backend")
        self.classifier = Classifier(bundle, encoder, decoder, backend="triton", reason=reason, precision=precision)
        self.topk = int(params["topk"])
        self.beam_width = int(bundle.search_defaults.get("beam_width", 10))
        self.max_batch = int(config["max_batch_size"])
        self.classifier.check_options(topk=self.topk, beam_width=self.beam_width)

    def execute(self, requests):
        from novic.serve.triton_requests import INPUT_IMAGE, INPUT_TOPK, classify_requests

        inputs = []
        for request in requests:
            item = {INPUT_IMAGE: pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE).as_numpy()}
            topk = pb_utils.get_input_tensor_by_name(request, INPUT_TOPK)
            if topk is not None:
                item[INPUT_TOPK] = topk.as_numpy()
            inputs.append(item)
        try:
            answers = classify_requests(self.classifier, inputs, topk=self.topk, beam_width=self.beam_width,
                                        batch_size=self.max_batch)
        except Exception as exc:  # noqa: BLE001 - a fault of the service: every request says so, no crash
            message = " ".join(f"novic: {type(exc).__name__}: {exc}".split())
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in answer.items()])
                for answer in answers]

    def finalize(self):
        self.classifier.close()
