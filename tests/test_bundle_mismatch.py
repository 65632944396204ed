"""A bundle whose graphs come from different models, with the manifest re-hashed so that every
file verifies: refused at load with one line naming the graph, not mid-classification."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)
from novic.runtime.backends.ort import OrtError  # noqa: E402
from novic.runtime.bundle import MANIFEST, BundleError, sha256_file  # noqa: E402
from novic.runtime.classifier import Classifier  # noqa: E402


def swap_graph(bundle: Path, name: str, graph: Path) -> None:
    """Put `graph` in the bundle as `name` and re-hash the manifest (what makes it load)."""
    shutil.copyfile(graph, bundle / name)
    manifest = json.loads((bundle / MANIFEST).read_text())
    for a in manifest["artifacts"]:
        if a["file"] == name:
            a["sha256"], a["size"] = sha256_file(bundle / name), (bundle / name).stat().st_size
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def encoder_graph(path: Path, side: int, width: int) -> Path:
    """pixels [B,3,side,side] -> embedding [B,width]: the I/O of another CLIP's image encoder."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, width), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["embedding"])], "other_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, side, side])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", width])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def bundle_copy(runtime_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(runtime_bundle.bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("side, width, shown", [(32, 32, "32x32 images and returns 32-d"),
                                                (64, 48, "64x64 images and returns 48-d")])
def test_an_image_encoder_of_another_model_is_refused_at_load(bundle_copy, tmp_path, side, width, shown):
    swap_graph(bundle_copy, "image_encoder.onnx", encoder_graph(tmp_path / "other.onnx", side, width))
    with pytest.raises(BundleError) as exc:
        Classifier.load(bundle_copy, backend="ort-cpu", precision="fp32")
    assert str(exc.value) == (f"{bundle_copy}: the image encoder takes {shown} embeddings, but the bundle "
                              f"preprocesses to 64x64 and its decoder takes 32-d embeddings: the graphs come "
                              f"from different models; re-export with novic-export onnx")


def test_a_prefill_of_another_model_is_refused_at_load(bundle_copy, tmp_path):
    import torch

    from novic.export.decoder_onnx import export_decoder
    from novic.model.decoder import ObjectDecoder
    from novic.runtime.bundle import Bundle

    cfg = Bundle.open(bundle_copy).decoder_config
    other = ObjectDecoder(type(cfg).from_dict({**cfg.to_dict(), "embed_dim": 16}))
    with torch.no_grad():
        graphs = export_decoder(other, tmp_path / "other", topk=10)
    swap_graph(bundle_copy, "decoder_prefill.onnx", Path(graphs["prefill"]["path"]))
    with pytest.raises(OrtError) as exc:
        Classifier.load(bundle_copy, backend="ort-cpu", precision="fp32")
    assert str(exc.value) == ("decoder_prefill.onnx: embedding has shape ['B', 16] but the bundle's decoder "
                              "config needs [N, 32]: the graph comes from another model; re-export with "
                              "novic-export onnx")
