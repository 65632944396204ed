"""Bundle writer + reader: round trip with hash verification, clear errors for tampered, truncated
or missing files and manifests, format too new, atomic writes (a failing export leaves nothing),
`novic-export check`, and `novic-export trt` without TensorRT."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from novic.runtime import bundle as rb
from novic.runtime.bundle import MANIFEST, Bundle, BundleError

NOUNS = ["cat", "dog", "red velvet cake", "brazil nut tree", "t-shirt", "car", "tabby cat", "hot dog",
         "hot air balloon", "dog sled"]


def make_checkpoint(path: Path) -> Path:
    """A tiny checkpoint: tiny random CLIP (tiny_spec), a small decoder over a real CLIP-BPE noun vocab."""
    import open_clip
    import torch

    from novic.config import DecoderConfig
    from novic.model.checkpoint import Checkpoint, save_checkpoint
    from novic.model.decoder import ObjectDecoder
    from novic.model.embedder import tiny_spec
    from novic.model.tokenizer import build_noun_vocab

    vocab = build_noun_vocab(open_clip.tokenizer.SimpleTokenizer(), NOUNS)
    cfg = DecoderConfig(embed_dim=32, vocab_size=vocab.table.vocab_size, max_tokens=vocab.max_tokens,
                        prefix_len=2, width=32, layers=2, heads=2, ffn_width=16)
    torch.manual_seed(0)
    model = ObjectDecoder(cfg)
    save_checkpoint(path, Checkpoint(cfg, model.state_dict(), tiny_spec(), vocab.table, vocab.nouns,
                                     vocab.noun_tokens))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from rich.console import Console

    from novic.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundle")
    ckpt = make_checkpoint(root / "tiny.safetensors")
    result = export_bundle(ckpt, root / "b", topk=10, beam_width=5, console=Console(stderr=True, quiet=True))
    return ckpt, Path(result["path"]), result


@pytest.fixture
def copy(exported, tmp_path):
    """A fresh copy of the exported bundle that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(exported[1], dst)
    return dst


def test_round_trip(exported):
    from novic.model.checkpoint import load_checkpoint

    ckpt_path, path, result = exported
    ckpt = load_checkpoint(ckpt_path)
    b = Bundle.open(path)
    m = b.manifest
    assert m["format"] == "novic-bundle" and m["format_version"] == 3 and m["novic_version"]
    assert b.decoder_config == ckpt.config
    assert b.token_table.to_dict() == ckpt.token_table.to_dict()
    assert b.nouns == NOUNS
    assert b.noun_tokens == [t[:-1] for t in ckpt.noun_tokens]   # bundle: without the final EOS
    assert b.graph_topk == 10 and b.search_defaults["beam_width"] == 5
    assert b.search_defaults["guided_max_cands"] >= 1
    assert b.preprocess["size"] == [64, 64] and b.embed_dim == 32
    b.preprocess["size"][0] = 1                              # a copy: the parsed config cannot drift
    assert b.preprocess["size"] == [64, 64] and b.preprocess_config.size == (64, 64)
    assert b.embedder["spec"]["model"] == "novic-tiny-clip"
    roles = {(a.role, a.precision, a.variant) for a in b.artifacts}
    assert roles == {(r, p, v) for r in rb.ROLES for p in ("fp32", "fp16") for v in ("plain", "fused")}
    assert b.precisions("image_encoder") == ["fp32", "fp16"]          # the plain graphs, as before
    assert b.fused_precisions() == ["fp16", "fp32"] and b.has_fused("fp16")
    assert set(m["export"]["fused_gates"].values()) == {"pass"}
    step = b.artifact("decoder_step", "fp16")
    assert step.input("kv_cache").dtype == "float16" and step.output("topk_logprobs").dtype == "float32"
    assert step.input("kv_cache").shape[2] == "M" and step.input("tokens").shape == ("N",)
    assert b.artifact("image_encoder").input("pixels").shape == ("B", 3, 64, 64)
    # every artifact hashed, plus the tokenizer (CLIP BPE merges copied from open_clip) and, where
    # WordNet is installed, the noun hierarchy; the fused encoders' weight files (which their u8
    # twins read too) once each
    checked = b.verify()
    wordnet = b.has_hierarchy
    assert len(checked) == 17 + wordnet and "tokenizer/bpe_simple_vocab_16e6.txt.gz" in checked
    assert {"image_encoder.fused.onnx.data", "image_encoder.fused.fp16.onnx.data"} <= set(checked)
    listed = [name for name, _ in result["artifacts"]]   # what novic-export onnx prints: each file once
    assert sorted(listed) == sorted(set(checked) - {"tokenizer/bpe_simple_vocab_16e6.txt.gz", "hierarchy.json"})
    # the uint8-input twins of the encoders ort-cuda loads (the fused ones), fp32 and fp16
    assert {(a.precision, a.variant) for a in b.artifacts if a.pixels == rb.U8_PIXELS} == {("fp32", "fused"),
                                                                                          ("fp16", "fused")}
    assert set(m["export"]["u8_gates"].values()) == {"pass"}
    assert ("hierarchy.json" in checked) == wordnet == (Path("/usr/share/wordnet/data.noun").is_file())
    assert b.tokenizer_file.name == "bpe_simple_vocab_16e6.txt.gz" and b.tokenizer_kind == "clip_bpe"
    assert b.artifact_path("decoder_step", "fp16") == path / "decoder_step.fp16.onnx"
    assert b.artifact_path("decoder_step", "fp16", "fused") == path / "decoder_step.fused.fp16.onnx"
    assert b.engines == []
    for a in m["artifacts"]:
        assert a["sha256"] == rb.sha256_file(path / a["file"]) and a["size"] == (path / a["file"]).stat().st_size
    assert result["seconds"] > 0 and set(result["timings"]) >= {"image encoder", "decoder", "fp16 decoder",
                                                                "fused graphs"}
    # no staging leftovers next to the bundle
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_missing_precision_is_named(exported):
    b = Bundle.open(exported[1])
    with pytest.raises(BundleError, match="no decoder_step graph in int8.*re-export with novic-export onnx"):
        b.artifact("decoder_step", "int8")
    with pytest.raises(BundleError, match="no image_encoder graph in fp8.*make it with novic-export calib"):
        b.artifact("image_encoder", "fp8")


def test_tampered_artifact_is_detected(copy):
    target = copy / "decoder_step.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF                    # same size, one bit pattern changed
    target.write_bytes(bytes(data))
    b = Bundle.open(copy)                           # sizes are fine: hashing is lazy...
    b.artifact_path("decoder_step", "fp16")         # ...and other artifacts still load
    with pytest.raises(BundleError) as info:
        b.artifact_path("decoder_step", "fp32")
    msg = str(info.value)
    assert "decoder_step.onnx" in msg and "sha256 mismatch" in msg and "re-export with novic-export onnx" in msg
    assert "\n" not in msg
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.open(copy, verify="eager")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.open(copy).verify()
    Bundle.open(copy, verify=False).artifact_path("decoder_step", "fp32")  # sizes only: not detected


def test_truncated_and_missing_artifacts(copy):
    enc = copy / "image_encoder.onnx"
    enc.write_bytes(enc.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"image_encoder.onnx: size 1000 bytes differs .*truncated"):
        Bundle.open(copy)
    enc.unlink()
    with pytest.raises(BundleError, match=r"image_encoder.onnx: missing from the bundle .*re-export"):
        Bundle.open(copy)


def test_a_version_1_manifest_still_reads(copy):
    """Bundles written before fused variants and the hierarchy (format_version 1) open and classify."""
    from novic.runtime.classifier import Classifier

    mpath = copy / MANIFEST
    data = json.loads(mpath.read_text())
    assert data["format_version"] == 3
    data["format_version"] = 1
    data["artifacts"] = [a for a in data["artifacts"] if a.get("variant", "plain") == "plain" and "pixels" not in a]
    assert all("variant" not in a for a in data["artifacts"])
    data.pop("hierarchy", None)
    mpath.write_text(json.dumps(data))
    bundle = Bundle.open(copy, verify="eager")
    assert bundle.format_version == 1 and not bundle.has_hierarchy and not bundle.fused_precisions()
    with Classifier.load(bundle, backend="ort-cpu", threads=1) as clf:
        assert clf.variant == "plain" and clf.classify([np.zeros((32, 32, 3), np.uint8)])[0].ok


def test_manifest_problems(copy, tmp_path):
    mpath = copy / MANIFEST
    text = mpath.read_text()
    mpath.write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match=r"manifest.json: not valid JSON .*truncated"):
        Bundle.open(copy)
    data = json.loads(text)
    for change, pattern in (
        ({"format": "something-else"}, "not a novic bundle manifest"),
        ({"format_version": 4}, r"format_version 4 is newer than this novic supports \(3.*upgrade novic"),
        ({"format_version": "1"}, "format_version must be an integer"),
    ):
        mpath.write_text(json.dumps({**data, **change}))
        with pytest.raises(BundleError, match=pattern):
            Bundle.open(copy)
    bad = json.loads(text)
    bad["artifacts"][0]["file"] = "../outside.onnx"
    mpath.write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="points outside the bundle"):
        Bundle.open(copy)
    bad = json.loads(text)
    bad["embedder"]["preprocess"]["size"] = [0, "x"]
    mpath.write_text(json.dumps(bad))
    with pytest.raises(BundleError, match=r"manifest.json: embedder.preprocess is invalid \(.*size"):
        Bundle.open(copy).preprocess
    bad = json.loads(text)
    bad["artifacts"][0]["sha256"] = "xyz"
    mpath.write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="sha256 must be 64 lowercase hex digits"):
        Bundle.open(copy)
    mpath.unlink()
    with pytest.raises(BundleError, match=r"manifest.json: missing, so .* is not a complete bundle"):
        Bundle.open(copy)
    with pytest.raises(BundleError, match="bundle directory not found"):
        Bundle.open(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is a directory"):
        Bundle.open(tmp_path / "file")


def test_verification_cache(copy, monkeypatch):
    calls = []
    real = rb.sha256_file
    monkeypatch.setattr(rb, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    Bundle.open(copy, verify="cached").artifact_path("decoder_step", "fp16")
    assert calls == ["decoder_step.fp16.onnx"] and (copy / rb.VERIFY_CACHE).is_file()
    calls.clear()
    Bundle.open(copy, verify="cached").artifact_path("decoder_step", "fp16")
    assert calls == []                                  # unchanged file: no re-hash
    f = copy / "decoder_step.fp16.onnx"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    Bundle.open(copy, verify="cached").artifact_path("decoder_step", "fp16")
    assert calls == ["decoder_step.fp16.onnx"]          # touched: hashed again


def test_verification_cache_sees_a_write_that_restores_the_mtime(copy):
    """A flipped byte written with the old mtime put back: the ctime moved, so cached mode hashes
    the file again and refuses it."""
    f = copy / "decoder_step.fp16.onnx"
    Bundle.open(copy, verify="cached").artifact_path("decoder_step", "fp16")
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    time.sleep(0.01)   # a ctime step the file system can show
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.open(copy, verify="cached").artifact_path("decoder_step", "fp16")


def test_failing_export_leaves_nothing(exported, tmp_path):
    from rich.console import Console

    from novic.export.bundle import ExportError, export_bundle

    ckpt = exported[0]
    quiet = Console(stderr=True, quiet=True)
    with pytest.raises(ExportError, match="failing after image encoder"):
        export_bundle(ckpt, tmp_path / "new", fail_after="image encoder", console=quiet)
    assert list(tmp_path.iterdir()) == []               # no target, no staging directory
    # an existing bundle stays intact when a replacing export fails
    shutil.copytree(exported[1], tmp_path / "old")
    before = (tmp_path / "old" / MANIFEST).read_text()
    with pytest.raises(ExportError):
        export_bundle(ckpt, tmp_path / "old", overwrite=True, fail_after="checkpoint", console=quiet)
    assert (tmp_path / "old" / MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    Bundle.open(tmp_path / "old", verify="eager")


def test_overwrite_needs_the_flag(exported, tmp_path):
    from novic.export.bundle import BundleExistsError, StagedBundle

    target = tmp_path / "b"
    shutil.copytree(exported[1], target)
    manifest = json.loads((target / MANIFEST).read_text())
    with pytest.raises(BundleExistsError, match="pass --force"):
        with StagedBundle(target):
            pass
    with StagedBundle(target, overwrite=True) as stage:
        for a in manifest["artifacts"]:
            for f in [a, *a.get("external_data", [])]:   # the graph and its weight files
                shutil.copy(exported[1] / f["file"], stage.tmp / f["file"])
        manifest["created"] = "replaced"
        manifest["tokenizer"] = manifest["hierarchy"] = None
        stage.commit(manifest)
    assert Bundle.open(target, verify="eager").created == "replaced"
    assert not (target / "tokenizer").exists()          # the old directory is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    other = tmp_path / "notabundle"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(BundleExistsError, match="is not a bundle"):
        with StagedBundle(other, overwrite=True):
            pass
    assert (other / "precious.txt").read_text() == "keep me"


def test_export_refuses_mismatched_clip(exported, tmp_path):
    from rich.console import Console

    from novic.export.bundle import ExportError, export_bundle

    with pytest.raises(ExportError, match="beam width 11 must be in"):
        export_bundle(exported[0], tmp_path / "x", topk=10, beam_width=11, console=Console(quiet=True))
    assert not (tmp_path / "x").exists()


def test_check_command_passes(exported):
    from rich.console import Console

    from novic.export.bundle import check_bundle

    quiet = Console(stderr=True, quiet=True)
    result = check_bundle(exported[1], n=24, beam_width=3, n_images=1, console=quiet)
    assert result["ok"], result
    d32 = result["decoder"]["fp32"]
    assert d32["agreement"] == {"greedy": 1.0, "beam": 1.0, "guided": 1.0}
    assert d32["max_abs_logprob_err"] < 1e-4
    # the slow oracle (full recomputation) agrees too
    slow = check_bundle(exported[1], n=6, beam_width=3, n_images=0, reference=True, precisions=["fp32"],
                        console=quiet)
    assert slow["ok"] and slow["decoder"]["fp32"]["agreement"]["guided"] == 1.0
    assert result["encoder"]["fp32"]["min_cosine"] >= 0.99999
    assert result["encoder"]["fp16"]["min_cosine"] >= 0.99
    assert "fp16" in result["decoder"]
    # the fused variants against the PyTorch oracle too (fp32: exact tokens)
    assert result["decoder"]["fp32 fused"]["agreement"] == {"greedy": 1.0, "beam": 1.0, "guided": 1.0}
    assert result["encoder"]["fp32 fused"]["min_cosine"] >= 0.99999
    assert {"fp16 fused"} <= set(result["decoder"]) & set(result["encoder"])


BLOCK_TENSORRT = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorrt":
                raise ImportError(f"No module named {name!r}")
    sys.meta_path.insert(0, Block())
""")


def test_trt_without_tensorrt_is_one_clear_line(exported):
    code = BLOCK_TENSORRT + textwrap.dedent(f"""
        sys.argv = ["novic-export", "trt", {str(exported[1])!r}]
        from novic.cli.export import main
        main()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "60"})
    assert result.returncode == 1, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "TensorRT is not installed" in lines[0] and "pip install 'novic[trt]'" in lines[0]
    assert "Traceback" not in result.stderr
    # the bundle is untouched: no engines directory, no manifest change
    assert not (exported[1] / "engines").exists()


# --- TensorRT build and runtime logic against a fake TensorRT ----------------------------------
# TensorRT and a GPU are not available here. These fakes implement the few TensorRT / CUDA calls we
# use, executing each "engine" with onnxruntime on its ONNX graph and keeping "device memory" in
# numpy arrays, so that everything around the real libraries is exercised: profiles handed to the
# builder, manifest records, resumed builds, engine checks, bucket padding, ping-pong buffers,
# candidate chunking, CUDA-graph capture/replay bookkeeping and the read-back of the scores.
import types  # noqa: E402

import numpy as np  # noqa: E402


class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


class FakeEngine:
    def __init__(self, spec: dict):
        from novic.runtime.backends.ort import make_session

        self.path, self.profiles = spec["onnx"], spec["profiles"]
        self.session = make_session(self.path, "cpu")
        self.io = {}
        for mode, values in (("in", self.session.get_inputs()), ("out", self.session.get_outputs())):
            for v in values:
                dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                         "tensor(int64)": np.int64}[v.type]
                self.io[v.name] = (mode, np.dtype(dtype), [d if isinstance(d, int) else -1 for d in v.shape])
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(self.profiles)
        self.device_memory_size_v2 = 4096
        self.contexts = 0

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if self.io[name][0] == "in" else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_profile_shape(self, name, index):
        return self.profiles[index][name]

    def create_execution_context(self, strategy=None):
        assert strategy == "USER_MANAGED"
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile, self.memory = engine, {}, {}, None, None

    def set_device_memory(self, ptr, size):   # TensorRT: at least device_memory_size_v2, 256-byte aligned
        assert size >= self.engine.device_memory_size_v2 and ptr % 256 == 0
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int)
        if not 0 <= index < self.engine.num_optimization_profiles:   # TensorRT raises, never returns False
            raise RuntimeError("Error in set_optimization_profile_async")
        self.profile = index

    def set_input_shape(self, name, shape):
        if name not in self.engine.profiles[self.profile]:        # a static input: its own shape only
            static = self.engine.io[name][2]
            self.shapes[name] = tuple(shape)
            return list(shape) == static
        lo, _opt, hi = self.engine.profiles[self.profile][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        assert self.memory is not None and self.profile is not None and isinstance(stream, int)
        if FakeCuda.capturing:
            if FakeCuda.capture_fails:
                return False
            FakeCuda.captured.append(self._execute)
        else:
            self._execute()
        return True

    def _execute(self):
        feeds = {}
        for name, (mode, dtype, _) in self.engine.io.items():
            if mode == "in":
                shape = self.shapes[name]
                n = int(np.prod(shape)) * dtype.itemsize
                feeds[name] = FakeCuda.memory[self.addresses[name]][:n].view(dtype).reshape(shape).copy()
        outs = self.engine.session.run(None, feeds)
        for v, value in zip(self.engine.session.get_outputs(), outs):
            raw = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
            dst = FakeCuda.memory[self.addresses[v.name]]
            assert raw.size <= dst.size, f"{v.name} overflows its buffer"
            dst[:raw.size] = raw
        FakeCuda.executions += 1


class FakeTrt(types.ModuleType):
    """The subset of the `tensorrt` module that novic uses."""

    TensorIOMode = _Enum(INPUT="input", OUTPUT="output")
    ExecutionContextAllocationStrategy = _Enum(USER_MANAGED="USER_MANAGED")
    NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=0)
    MemoryPoolType = _Enum(WORKSPACE="workspace")
    __version__ = "11.4.0.106"
    built_profiles: list = []

    class Logger:
        WARNING, VERBOSE = 1, 0

        def __init__(self, level=1):
            pass

    @staticmethod
    def nptype(dtype):
        return dtype

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(json.loads(bytes(data)))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            assert flags == 1  # strongly typed
            return types.SimpleNamespace(inputs=[])

        def create_builder_config(self):
            return FakeConfig()

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, network, config):
            FakeTrt.built_profiles.append(config.profiles)
            return json.dumps({"onnx": network.path, "profiles": config.profiles}).encode()

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnx
            model = onnx.load(path, load_external_data=False)
            self.network.path = path
            names = [i.name for i in model.graph.input]
            self.network.num_inputs = len(names)
            self.network.get_input = lambda i: types.SimpleNamespace(name=names[i])
            return True


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeConfig:
    def __init__(self):
        self.profiles, self.cache = [], None

    def set_memory_pool_limit(self, pool, size):
        pass

    def create_timing_cache(self, data):
        return types.SimpleNamespace(data=bytes(data) + b"+", serialize=lambda: self.cache.data)

    def set_timing_cache(self, cache, ignore_mismatch):
        """TensorRT returns False for a cache from another device (and keeps none)."""
        assert ignore_mismatch is False
        if cache.data.startswith(b"foreign"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)


class FakeCuda:
    """novic.runtime.backends.trt.Cuda over numpy 'device memory'."""

    memory: dict = {}
    capturing = False
    capture_fails = False       # execute_async_v3 fails while capturing (kernels that cannot be captured)
    captured: list = []
    executions = 0
    launches = 0

    def __init__(self, device=0):
        self.rt = types.SimpleNamespace(cudaGraphExecDestroy=lambda g: None, cudaStreamDestroy=lambda s: None)

    def set_device(self):
        pass

    def device_properties(self):
        return "Fake H100", "9.0"

    def stream(self):
        return types.SimpleNamespace(handle=7)   # like cudaStream_t: not an int itself

    @staticmethod
    def handle(stream):
        return stream.handle

    def malloc(self, nbytes):
        ptr = (len(FakeCuda.memory) + 1) << 32
        FakeCuda.memory[ptr] = np.zeros(max(int(nbytes), 1), np.uint8)
        return ptr

    def malloc_host(self, nbytes, dtype):
        return np.zeros(max(int(nbytes), 1) // np.dtype(dtype).itemsize, dtype)

    def h2d(self, dst, src, nbytes, stream):   # like cudaMemcpy: a count past either buffer is a bug
        assert nbytes <= min(FakeCuda.memory[dst].nbytes, src.nbytes), (nbytes, FakeCuda.memory[dst].nbytes, src.nbytes)
        FakeCuda.memory[dst][:nbytes] = src.view(np.uint8)[:nbytes]

    def d2h(self, dst, src, nbytes, stream):
        assert nbytes <= min(FakeCuda.memory[src].nbytes, dst.nbytes), (nbytes, FakeCuda.memory[src].nbytes, dst.nbytes)
        dst.view(np.uint8)[:nbytes] = FakeCuda.memory[src][:nbytes]

    def sync(self, stream):
        pass

    def begin_capture(self, stream):
        FakeCuda.capturing, FakeCuda.captured = True, []

    def end_capture(self, stream):
        FakeCuda.capturing = False
        return list(FakeCuda.captured)

    def launch(self, graph, stream):
        FakeCuda.launches += 1
        for fn in graph:
            fn()

    def free(self, ptr):
        pass

    def free_host(self, arr):
        pass


@pytest.fixture
def fake_trt(monkeypatch):
    from novic.export import tensorrt as export_trt
    from novic.runtime.backends import trt as backend
    from novic.runtime.backends.select import Probe

    fake = FakeTrt("tensorrt")
    FakeTrt.built_profiles = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(export_trt, "probe", lambda: Probe(gpu_name="Fake H100", compute_capability="9.0",
                                                           tensorrt_version=fake.__version__, cuda_python=True))
    monkeypatch.setattr(backend, "Cuda", FakeCuda)
    FakeCuda.memory, FakeCuda.executions, FakeCuda.launches, FakeCuda.capture_fails = {}, 0, 0, False
    return fake


def test_trt_build_records_engines_and_resumes(copy, fake_trt, monkeypatch):
    from rich.console import Console

    from novic.export.tensorrt import build_engines
    from novic.runtime import trt_plan
    from novic.runtime.backends.select import Probe, select_for_bundle

    quiet = Console(stderr=True, quiet=True)
    result = build_engines(copy, buckets=(1, 4), beam_width=3, console=quiet)
    assert [e["role"] for e in result["engines"]] == list(rb.ROLES) and result["skipped"] == []
    b = Bundle.open(copy, verify="eager")                      # engine hashes recorded and correct
    # one timing cache per GPU and TensorRT release, carried from engine to engine (the fake appends
    # "+" per build)
    cache = copy / "engines" / "timing.sm90.trt11.4.0.cache"
    assert len(b.engines) == 3 and cache.read_bytes() == b"+++"
    step = b.engines_for("decoder_step")[0]
    assert step.file == "engines/decoder_step.fp16.sm90.trt11.4.0.engine"
    assert step.tensorrt_version == "11.4.0.106" and step.compute_capability == "9.0" and step.precision == "fp16"
    assert step.extra["plan"]["buckets"] == [1, 4] and step.extra["plan"]["beam_width"] == 3
    # the profiles handed to the builder are the plan's: buckets 1,4 images -> 3,12 rows for the step
    plan = trt_plan.plan_graph("decoder_step", b.artifact("decoder_step", "fp16").signature(), b.decoder_config,
                               b.graph_topk, trt_plan.PlanParams.from_dict(step.extra["plan"]))
    dynamic = {"tokens", "beam_idx", "kv_cache", "cand_ids"}   # position/temperature are static: no range
    assert FakeTrt.built_profiles[2] == [{k: [list(s) for s in v] for k, v in p.shapes.items() if k in dynamic}
                                         for p in plan.profiles]
    assert [p["bucket"] for p in step.profiles] == [3, 12]
    # a second run is a no-op (resume); --force rebuilds; the timing cache is carried forward
    again = build_engines(copy, buckets=(1, 4), beam_width=3, console=quiet)
    assert again["engines"] == [] and again["skipped"] == list(rb.ROLES)
    forced = build_engines(copy, buckets=(1, 4), beam_width=3, force=True, console=quiet)
    assert len(forced["engines"]) == 3 and len(Bundle.open(copy).engines) == 3
    assert cache.read_bytes() == b"++++++"
    # a cache TensorRT refuses (another device, a driver change) is replaced by a fresh one
    cache.write_bytes(b"foreign")
    build_engines(copy, buckets=(1, 4), beam_width=3, force=True, roles=("image_encoder",), console=quiet)
    assert cache.read_bytes() == b"+"
    # the same release with another build number: rebuilt (same file), and the manifest keeps one entry
    monkeypatch.setattr(FakeTrt, "__version__", "11.4.0.200")
    rebuilt = build_engines(copy, buckets=(1, 4), beam_width=3, console=quiet)
    assert len(rebuilt["engines"]) == 3
    b = Bundle.open(copy, verify="eager")
    assert len(b.engines) == 3 and {e.tensorrt_version for e in b.engines} == {"11.4.0.200"}
    assert b.engines_for("decoder_step")[0].file == "engines/decoder_step.fp16.sm90.trt11.4.0.engine"
    # an engine recorded under an older name (before names carried the patch release) is replaced
    # by a rebuild, and its file deleted
    manifest = json.loads((copy / MANIFEST).read_text())
    step_entry = next(e for e in manifest["engines"] if e["role"] == "decoder_step")
    old_name = step_entry["file"].replace(".trt11.4.0.", ".trt11.4.")
    (copy / step_entry["file"]).rename(copy / old_name)
    step_entry["file"] = old_name
    (copy / MANIFEST).write_text(json.dumps(manifest))
    build_engines(copy, buckets=(1, 4), beam_width=3, force=True, roles=("decoder_step",), console=quiet)
    assert not (copy / old_name).exists()
    b = Bundle.open(copy, verify="eager")
    assert sorted(p.name for p in (copy / "engines").glob("*.engine")) == sorted(Path(e.file).name for e in b.engines)
    monkeypatch.setattr(FakeTrt, "__version__", "11.4.0.106")
    # other buckets: a different plan, so the engines are rebuilt and replaced
    assert len(build_engines(copy, buckets=(2,), beam_width=3, console=quiet)["engines"]) == 3
    # the selection picks them on a matching machine
    facts = Probe(gpu_name="Fake H100", compute_capability="9.0", tensorrt_version="11.4.0.106", cuda_python=True,
                  ort_version="1", ort_providers=("CPUExecutionProvider",))
    choice = select_for_bundle(Bundle.open(copy), facts=facts)
    assert choice.backend == "trt" and set(choice.engines) == set(rb.ROLES)


@pytest.mark.parametrize("cuda_graphs", [True, False, "capture fails"])
def test_trt_session_matches_onnxruntime(copy, fake_trt, cuda_graphs):
    """The TensorRT session's host logic (buckets, padding, ping-pong, chunking, read-back) gives the
    same tokens and scores as the onnxruntime session over the same fp16 graphs; when an engine
    cannot be captured into a CUDA graph, it runs plainly with the same results and says why."""
    from rich.console import Console

    from novic.export.tensorrt import build_engines
    from novic.runtime import search
    from novic.runtime.backends import trt as backend
    from novic.runtime.backends.ort import OrtDecoderSession, OrtImageEncoder
    from novic.runtime.trie import TokenTrie

    build_engines(copy, buckets=(1, 4), beam_width=3, step_max_cands=2, console=Console(stderr=True, quiet=True))
    b = Bundle.open(copy)
    engines = {e.role: e for e in b.engines}
    FakeCuda.capture_fails = cuda_graphs == "capture fails"
    cuda_graphs = bool(cuda_graphs)
    trt_sess = backend.TrtDecoderSession(b.engine_path(engines["decoder_prefill"]),
                                         b.engine_path(engines["decoder_step"]), b.decoder_config,
                                         engines=engines, cuda_graphs=cuda_graphs)
    ort_sess = OrtDecoderSession(b.artifact_path("decoder_prefill", "fp16"), b.artifact_path("decoder_step", "fp16"),
                                 b.decoder_config)
    assert trt_sess.topk == ort_sess.topk == 10
    trie = TokenTrie(b.noun_tokens)
    assert trie.max_candidates > 2                  # guided steps need candidate chunking (2 per call)
    rng = np.random.default_rng(1)
    for n in (1, 3, 4):                             # 3 pads to the 4-image bucket
        embeds = rng.standard_normal((n, b.embed_dim)).astype(np.float32)
        for width, guide in ((1, None), (3, None), (3, trie), (1, trie)):
            for _ in range(2):                       # second round replays captured graphs
                got = search.beam_search(trt_sess, embeds, width, trie=guide)
                want = search.beam_search(ort_sess, embeds, width, trie=guide)
                assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in want]
                assert np.allclose([[h.logprob for h in hs] for hs in got if hs],
                                   [[h.logprob for h in hs] for hs in want if hs], atol=1e-6)
    from novic.runtime.trt_plan import PlanError
    with pytest.raises(PlanError, match="exceeds the largest bucket 4"):
        trt_sess.prefill(np.zeros((5, b.embed_dim), np.float32), 1.0, np.zeros((5, 1), np.int64))
    assert trt_sess.max_images == 4 and trt_sess.max_rows == 12
    if FakeCuda.capture_fails:
        assert not trt_sess.cuda_graphs and FakeCuda.launches == 0
        assert trt_sess.cuda_graph_error == "decoder_prefill: execute_async_v3 failed (see TensorRT's messages above)"
    elif cuda_graphs:
        assert trt_sess.cuda_graphs and trt_sess.cuda_graph_error is None
        assert FakeCuda.launches > 0                 # replays happened
    # the image encoder, in chunks of the largest bucket
    enc = backend.TrtImageEncoder(b.engine_path(engines["image_encoder"]), engines["image_encoder"],
                                  cuda_graphs=cuda_graphs)
    ref = OrtImageEncoder(b.artifact_path("image_encoder", "fp16"))
    pixels = rng.standard_normal((6, 3, 64, 64)).astype(np.float32)
    assert enc.image_size == (64, 64) and enc.embed_dim == b.embed_dim
    assert np.allclose(enc(pixels), ref(pixels), atol=1e-6)
    assert np.allclose(enc(pixels[:1]), ref(pixels[:1]), atol=1e-6)
    assert enc.cuda_graphs == (cuda_graphs and not FakeCuda.capture_fails)
    for sess in (trt_sess, enc):                     # close() frees every buffer it allocated
        assert sess.dev and sess.host
        sess.close()
        assert sess.dev == {} and sess.host == {}


def test_trt_encoder_with_fp16_input_and_output(tmp_path, fake_trt):
    """An encoder engine with fp16 I/O (TensorRT takes the ONNX's I/O dtypes): pixels are converted
    into the engine's dtype and the bytes copied each way are counted in it. The fake CUDA refuses
    a copy past either buffer, so counting fp32 bytes for an fp16 input (as before f3e71f8) fails."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from novic.runtime import trt_plan
    from novic.runtime.backends import trt as backend

    size, F = 16, 8
    weight = np.random.default_rng(2).standard_normal((3, F)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["pooled", "weight"], ["y"]),
         helper.make_node("Cast", ["y"], ["embedding"], to=TensorProto.FLOAT16)],
        "fp16_io_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, ["B", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT16, ["B", F])],
        [numpy_helper.from_array(weight, "weight")])
    onnx_path = tmp_path / "encoder_fp16_io.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), onnx_path)
    signature = {"inputs": [{"name": "pixels", "dtype": "float16", "shape": ["B", 3, size, size]}],
                 "outputs": [{"name": "embedding", "dtype": "float16", "shape": ["B", F]}]}
    plan = trt_plan.plan_encoder(signature, (1, 4))
    engine_path = tmp_path / "encoder.engine"
    engine_path.write_text(json.dumps({"onnx": str(onnx_path), "profiles": [
        {k: [list(s) for s in v] for k, v in p.shapes.items()} for p in plan.profiles]}))
    entry = {"tensorrt_version": fake_trt.__version__, "compute_capability": "9.0", "plan": {"buckets": [1, 4]}}

    enc = backend.TrtImageEncoder(engine_path, entry)
    assert (enc.host["pixels"].dtype, enc.host["embedding"].dtype) == (np.float16, np.float16)
    pixels = np.random.default_rng(3).standard_normal((6, 3, size, size)).astype(np.float32)
    want = (pixels.astype(np.float16).astype(np.float32).mean(axis=(2, 3)) @ weight).astype(np.float16)
    for batch in (pixels, pixels[:1], pixels[:3]):   # chunks of 4, a bucket of 1, 3 padded to 4
        got = enc(batch)
        assert got.dtype == np.float32 and got.shape == (len(batch), F)
        np.testing.assert_allclose(got, want[:len(batch)].astype(np.float32), rtol=2e-3, atol=2e-3)
    enc.close()


def test_trt_engine_mismatch_is_refused(copy, fake_trt, monkeypatch):
    from rich.console import Console

    from novic.export.tensorrt import build_engines
    from novic.runtime.backends import trt as backend

    build_engines(copy, buckets=(1,), beam_width=2, console=Console(stderr=True, quiet=True))
    b = Bundle.open(copy)
    entry = b.engines_for("image_encoder")[0]
    path = b.engine_path(entry)
    monkeypatch.setattr(FakeTrt, "__version__", "11.5.0.1")
    with pytest.raises(backend.TrtError, match=r"built with TensorRT 11.4.0.106 but 11.5.0.1 is installed; rebuild"):
        backend.TrtImageEncoder(path, entry)
    monkeypatch.setattr(FakeTrt, "__version__", "11.4.0.106")
    monkeypatch.setattr(FakeCuda, "device_properties", lambda self: ("Fake A100", "8.0"))
    with pytest.raises(backend.TrtError, match=r"built for sm_90 but this GPU \(Fake A100\) is sm_80"):
        backend.TrtImageEncoder(path, entry)


def test_trt_quantized_encoder_engines(copy, fake_trt, monkeypatch):
    """--precision int8|fp8: the encoder engine comes from the calibrated Q/DQ graph, the decoder
    engines from fp16; onnxruntime's dynamic int8 (not Q/DQ) and FP8 on a pre-Ada GPU are refused
    with the fix; the selection then reports the mixed precision."""
    from rich.console import Console

    from novic.calib.run import add_artifact, calibrate_bundle
    from novic.export.tensorrt import TensorRTMissing, build_engines
    from novic.runtime.backends import trt as backend
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.backends.select import Probe, select_for_bundle

    quiet = Console(stderr=True, quiet=True)
    with pytest.raises(BundleError, match=r"no image_encoder graph in int8"):
        build_engines(copy, buckets=(1,), beam_width=2, precision="int8", console=quiet)
    calib = dict(n=8, n_heldout=4, min_agreement=0.0, console=quiet)
    assert calibrate_bundle(copy, method="dynamic", **calib)["written"]
    with pytest.raises(BundleError, match=r"made with --method dynamic \(onnxruntime-only operators\); TensorRT "
                                          r"needs Q/DQ: rerun novic-export calib .* --method static"):
        build_engines(copy, buckets=(1,), beam_width=2, precision="int8", console=quiet)
    assert calibrate_bundle(copy, method="static", **calib)["written"]   # replaces the dynamic one
    result = build_engines(copy, buckets=(1, 4), beam_width=2, precision="int8", console=quiet)
    built = {e["role"]: e for e in result["engines"]}
    assert {r: e["precision"] for r, e in built.items()} == {"image_encoder": "int8", "decoder_prefill": "fp16",
                                                            "decoder_step": "fp16"}
    assert built["image_encoder"]["file"] == "engines/image_encoder.int8.sm90.trt11.4.0.engine"
    assert built["image_encoder"]["source"] == "image_encoder.int8.onnx"
    # the engine computes what the int8 graph computes (the fake engine runs that graph)
    b = Bundle.open(copy, verify="eager")
    entry = b.engines_for("image_encoder")[0]
    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    want = OrtImageEncoder(b.artifact_path("image_encoder", "int8"))(pixels)
    assert np.allclose(backend.TrtImageEncoder(b.engine_path(entry), entry)(pixels), want, atol=1e-6)
    # fp16 engines next to them: the selection prefers the int8 encoder and says so
    assert [e["role"] for e in build_engines(copy, buckets=(1, 4), beam_width=2, console=quiet)["engines"]] == \
        ["image_encoder"]                                       # fp16 decoder engines are already up to date
    facts = Probe(gpu_name="Fake H100", compute_capability="9.0", tensorrt_version="11.4.0.106", cuda_python=True,
                  ort_version="1", ort_providers=("CPUExecutionProvider",))
    choice = select_for_bundle(Bundle.open(copy), facts=facts)
    assert choice.precision == "int8 encoder, fp16 decoder" and choice.engines["image_encoder"].precision == "int8"

    # fp8: a Q/DQ graph in the fp8 slot (here the static int8 graph stands in for ModelOpt's output)
    staged = copy / ".staged.onnx"                               # add_artifact moves its input
    shutil.copyfile(copy / "image_encoder.int8.onnx", staged)
    add_artifact(copy, staged, role="image_encoder", precision="fp8",
                 name="image_encoder.fp8.onnx", info={"method": "modelopt-fp8", "tensorrt": True})
    assert not staged.exists()
    from novic.export import tensorrt as export_trt
    monkeypatch.setattr(export_trt, "probe", lambda: Probe(gpu_name="Fake A100", compute_capability="8.0",
                                                           tensorrt_version="11.4.0.106", cuda_python=True))
    with pytest.raises(TensorRTMissing, match=r"FP8 engines need an Ada or Hopper GPU .* Fake A100 is sm_80: "
                                              r"use --precision int8 or fp16"):
        build_engines(copy, buckets=(1, 4), beam_width=2, precision="fp8", console=quiet)
    monkeypatch.setattr(export_trt, "probe", lambda: Probe(gpu_name="Fake H100", compute_capability="9.0",
                                                           tensorrt_version="11.4.0.106", cuda_python=True))
    result = build_engines(copy, buckets=(1, 4), beam_width=2, precision="fp8", console=quiet)
    assert [(e["role"], e["precision"]) for e in result["engines"]] == [("image_encoder", "fp8")]
    assert select_for_bundle(Bundle.open(copy), facts=facts).precision == "fp8 encoder, fp16 decoder"
