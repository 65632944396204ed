"""The offline route for a released model (README "Offline"), end to end with stand-ins: a release
zip in the original format whose CLIP model lives on the Hugging Face hub ('openclip:ORG/REPO', as
the released ones), that CLIP model's weights file and its tokenizer file, copied by hand. With
HF_HUB_OFFLINE=1 (or a hub that cannot be reached) each command either works from the copied files
or fails at once with one line naming the file to fetch and the flag that takes it.

The commands run as subprocesses: offline mode is process state (environment, huggingface_hub)."""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from fixtures_runtime import runtime_bundle  # noqa: F401  (fixture)
from test_importer import NOUNS, make_original

HUB_REPO = "novic-test/tiny-clip"     # a stand-in hub id: never fetched (offline)
ZIP_NAME = "vitb16_ft2_ta4_ovod_20240610_105233.zip"


@pytest.fixture(scope="module")
def copied_files(tmp_path_factory):
    """What a user copies onto the offline machine: the release zip, the CLIP weights file, the
    tokenizer file."""
    import open_clip
    import torch
    from open_clip.tokenizer import default_bpe
    from safetensors.torch import save_file

    from novic.model import embedder as emb

    tmp = tmp_path_factory.mktemp("copied")
    path, _, _ = make_original(tmp, H=64, layers=2, heads=8, ffn=16, seed=3,
                               embedder_spec=f"openclip:{HUB_REPO}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(path, f"{ZIP_NAME[:-4]}/ovod_20240610_105233/{path.name}")
    (tmp / ZIP_NAME).write_bytes(buf.getvalue())
    emb._register_config("novic-tiny-clip.json")
    torch.manual_seed(5)
    clip = open_clip.create_model("novic-tiny-clip")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
    shutil.copyfile(default_bpe(), tmp / "bpe_simple_vocab_16e6.txt.gz")   # this model's tokenizer file
    return tmp


def novic(tool: str, *args, offline_env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), "NOVIC_CACHE": str(cwd / "nc"),
           "COLUMNS": "400"}
    env.update(offline_env or {})
    code = f"import sys; sys.argv[0] = 'novic-{tool}'; from novic.cli.{tool} import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "Retrying" not in result.stderr, result.stderr
    assert not any("WARNING" in l for l in lines), result.stderr
    return errors[0]


def test_offline_recipe_from_copied_files(copied_files, tmp_path):
    files = copied_files
    ckpt, bundle = tmp_path / "ta4.safetensors", tmp_path / "ta4-bundle"

    # 1. import: the tokenizer is the hub's; offline it must come from a file.
    line = one_error_line(novic("importer", files / ZIP_NAME, "--out", ckpt, cwd=tmp_path))
    assert f"https://huggingface.co/{HUB_REPO}/resolve/main/spiece.model" in line
    assert "--tokenizer spiece.model" in line and "HF_HUB_OFFLINE=1" in line
    assert not ckpt.exists()
    res = novic("importer", files / ZIP_NAME, "--out", ckpt, "--tokenizer", files / "bpe_simple_vocab_16e6.txt.gz",
                cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]

    # 2. export: the CLIP weights are the hub's; offline they must come from a file.
    line = one_error_line(novic("export", "onnx", "--checkpoint", ckpt, "--out", bundle, cwd=tmp_path))
    assert f"https://huggingface.co/{HUB_REPO}/resolve/main/open_clip_model.safetensors" in line
    assert "--pretrained open_clip_model.safetensors" in line
    assert not bundle.exists()
    # A hub model that is not one of the released ones also needs its open_clip name.
    line = one_error_line(novic("export", "onnx", "--checkpoint", ckpt, "--out", bundle,
                                "--pretrained", files / "open_clip_model.safetensors", cwd=tmp_path))
    assert "--clip" in line
    res = novic("export", "onnx", "--checkpoint", ckpt, "--out", bundle, "--clip", "novic-tiny-clip",
                "--pretrained", files / "open_clip_model.safetensors",
                "--tokenizer", files / "bpe_simple_vocab_16e6.txt.gz", "--no-fp16", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tokenizer"]["file"].endswith("bpe_simple_vocab_16e6.txt.gz")

    # 3. classify, with the bundle's nouns and with a noun list of one's own (needs the tokenizer file).
    from PIL import Image
    Image.new("RGB", (72, 64), (200, 40, 30)).save(tmp_path / "photo.png")
    res = novic("run", "--bundle", bundle, "--backend", "ort-cpu", "--json", "--quiet", "-k", "2",
                tmp_path / "photo.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    labels = [l["text"] for l in json.loads(res.stdout.splitlines()[0])["labels"]]
    assert len(labels) == 2 and set(labels) <= set(NOUNS)
    (tmp_path / "mine.txt").write_text("zebra\nteapot\n")
    res = novic("run", "--bundle", bundle, "--backend", "ort-cpu", "--json", "--quiet", "-k", "2",
                "--vocab", tmp_path / "mine.txt", tmp_path / "photo.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert {l["text"] for l in json.loads(res.stdout.splitlines()[0])["labels"]} <= {"zebra", "teapot"}


def test_an_unreachable_hub_is_detected_without_hf_hub_offline(copied_files, tmp_path):
    """No HF_HUB_OFFLINE, but nothing answers at the hub's address: the same one line, at once."""
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}   # the discard port: nothing listens
    line = one_error_line(novic("importer", copied_files / ZIP_NAME, "--out", tmp_path / "c.safetensors",
                                offline_env=env, cwd=tmp_path))
    assert "http://127.0.0.1:9 is unreachable" in line
    assert f"http://127.0.0.1:9/{HUB_REPO}/resolve/main/spiece.model" in line and "--tokenizer" in line


def test_export_does_not_load_a_text_tokenizer_it_does_without(runtime_bundle, tmp_path, monkeypatch):
    """CLIP BPE tokens: the tokenizer file ships with open_clip, so export never asks for the model's
    text tokenizer (for an HF tokenizer, that would wait on the hub: novic-bench compare --config paper)."""
    from novic.export.bundle import export_bundle
    from novic.model import embedder as emb

    def refuse(spec):
        raise AssertionError(f"export loaded the text tokenizer of {spec.model}")
    monkeypatch.setattr(emb, "_load_tokenizer", refuse)
    result = export_bundle(runtime_bundle.checkpoint, tmp_path / "b", fp16=False)
    assert result["manifest"]["tokenizer"]["file"].endswith("bpe_simple_vocab_16e6.txt.gz")


def test_novic_run_honours_hf_hub_offline_for_the_clip_weights(tmp_path, monkeypatch):
    """novic-run's first use of a released model downloads its CLIP weights from the hub; with
    HF_HUB_OFFLINE=1 that is one line naming the file and how to pass it, without a request."""
    from novic import registry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # were it asked, nothing would answer
    monkeypatch.delenv("NOVIC_CLIP_WEIGHTS", raising=False)
    with pytest.raises(registry.DownloadError) as info:
        registry.fetch_clip_weights("timm/ViT-B-16-SigLIP", cache=tmp_path)
    message = str(info.value)
    assert "http://127.0.0.1:9/timm/ViT-B-16-SigLIP/resolve/main/open_clip_model.safetensors" in message
    assert "NOVIC_CLIP_WEIGHTS=PATH/open_clip_model.safetensors" in message and "\n" not in message
    assert not (tmp_path / "clip").exists() or not any((tmp_path / "clip").rglob("*.part"))
    # Weights already in the cache are used offline.
    cached = tmp_path / "clip" / "timm--ViT-B-16-SigLIP" / "open_clip_model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert registry.fetch_clip_weights("timm/ViT-B-16-SigLIP", cache=tmp_path) == cached
