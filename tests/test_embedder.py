"""The open_clip adapter on the tiny random CLIP shipped with novic."""
import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from PIL import Image  # noqa: E402

from novic.model.embedder import (Embedder, EmbedderError, EmbedderSpec,  # noqa: E402
                                  resolve_config_file, tiny_spec)

TEXTS = ["a photo of a dog", "red velvet cake", "brazil nut tree"]


@pytest.fixture(scope="module")
def tiny():
    return Embedder.load(tiny_spec())


def random_pixels(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def random_image(seed=0, size=(96, 80)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_embeddings_are_unit_vectors(tiny):
    text = tiny.encode_text(TEXTS)
    image = tiny.encode_image(random_pixels(3))
    assert text.shape == image.shape == (3, tiny.dim) and tiny.dim == 32
    assert text.dtype == image.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(text[0], text[1])  # different inputs, different embeddings


def test_batching_does_not_change_embeddings(tiny):
    torch.testing.assert_close(tiny.encode_text(TEXTS, batch_size=2), tiny.encode_text(TEXTS))
    pixels = random_pixels(3)
    torch.testing.assert_close(tiny.encode_image(pixels, batch_size=1), tiny.encode_image(pixels))


def test_random_weights_are_deterministic_across_loads(tiny):
    again = Embedder.load(tiny_spec())
    assert torch.equal(again.encode_text(TEXTS), tiny.encode_text(TEXTS))
    assert torch.equal(again.encode_image(random_pixels(2)), tiny.encode_image(random_pixels(2)))
    other = Embedder.load(tiny_spec(), seed=1)
    assert not torch.allclose(other.encode_text(TEXTS), tiny.encode_text(TEXTS))


def test_local_weights_file(tiny, tmp_path):
    from safetensors.torch import save_file

    # Weights that differ from the seeded init, so loading them is observable.
    g = torch.Generator().manual_seed(7)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in tiny.model.state_dict().items()}
    path = tmp_path / "tiny-weights.safetensors"
    save_file(state, str(path))
    spec = EmbedderSpec(model=tiny_spec().model, pretrained=str(path), config_file=tiny_spec().config_file)
    loaded = Embedder.load(spec)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not torch.allclose(loaded.encode_text(TEXTS), tiny.encode_text(TEXTS))


def test_preprocess_matches_open_clip_transform(tiny):
    pp = tiny.preprocess
    assert pp == {"size": [64, 64], "mean": list(open_clip.OPENAI_DATASET_MEAN),
                  "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest", "fill_color": 0, "mode": "RGB"}
    json.dumps(pp)  # plain data for a manifest
    _, _, oracle = open_clip.create_model_and_transforms(tiny_spec().model)
    image = random_image()
    assert torch.equal(tiny.image_transform()(image), oracle(image))
    assert tiny.image_transform()(image).shape == (3, *pp["size"])


def test_preprocess_follows_the_models_own_config(tmp_path):
    # Models from the hub carry their preprocessing (SigLIP: mean/std 0.5, squash); the same
    # mechanism through a local open_clip_config.json.
    model_cfg = json.loads(resolve_config_file(tiny_spec().config_file).read_text())
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                      "resize_mode": "squash"}
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    emb = Embedder.load(EmbedderSpec(model=f"local-dir:{tmp_path}"))
    pp = emb.preprocess
    assert {k: pp[k] for k in preprocess_cfg} == preprocess_cfg and pp["size"] == [64, 64]
    _, _, oracle = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    image = random_image(1)
    assert torch.equal(emb.image_transform()(image), oracle(image))


def test_wrong_pixel_shape_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"expects preprocessed pixels \[N, 3, 64, 64\], got \[2, 3, 32, 32\]"):
        tiny.encode_image(torch.zeros(2, 3, 32, 32))


def test_spec_dict_round_trip_and_validation():
    spec = EmbedderSpec(model="ViT-B-32", pretrained="openai")
    assert EmbedderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert EmbedderSpec.from_dict(tiny_spec().to_dict()) == tiny_spec()
    with pytest.raises(ValueError, match="brings its own weights"):
        EmbedderSpec(model="hf-hub:timm/ViT-B-16-SigLIP", pretrained="webli")
    with pytest.raises(ValueError, match="defines model 'other'"):
        EmbedderSpec(model="novic-tiny-clip", config_file="configs/other.json")
    with pytest.raises(ValueError, match="unknown keys"):
        EmbedderSpec.from_dict({"model": "ViT-B-32", "weights": "x"})


@pytest.mark.parametrize("spec, message", [
    (EmbedderSpec("ViT-B-32", pretrained="/nonexistent/w.safetensors"),
     "weights file not found: /nonexistent/w.safetensors"),
    (EmbedderSpec("ViT-B-32", pretrained="no-such-tag"), "ViT-B-32 has no pretrained tag 'no-such-tag'"),
    (EmbedderSpec("No-Such-Model"), "unknown open_clip model 'No-Such-Model'"),
    (EmbedderSpec("novic-tiny-clip", config_file="/nonexistent/novic-tiny-clip.json"),
     "open_clip model config not found: /nonexistent/novic-tiny-clip.json"),
])
def test_load_errors_are_one_clear_line(spec, message):
    with pytest.raises(EmbedderError) as info:
        Embedder.load(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mismatched_weights_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(EmbedderError, match=f"cannot create novic-tiny-clip with weights {path}"):
        Embedder.load(EmbedderSpec("novic-tiny-clip", str(path), "novic-tiny-clip.json"))


def test_siglip_tokenizer_offline_is_a_clear_error(monkeypatch):
    # SigLIP's tokenizer lives on the Hugging Face hub, which tests cannot reach.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbedderError) as info:
        Embedder.load(EmbedderSpec("ViT-B-16-SigLIP"))
    message = str(info.value)
    assert message.startswith("cannot load the tokenizer of ViT-B-16-SigLIP")
    assert "timm/ViT-B-16-SigLIP" in message and "\n" not in message
