"""Backend auto-selection with injected facts (novic.runtime.backends.select)."""
import pytest

from fixtures_runtime import runtime_bundle  # noqa: F401  (fixture)
from novic.runtime.backends.select import BackendError, Choice, Probe, probe, probe_parts, select_backend

ROLES = ("image_encoder", "decoder_prefill", "decoder_step")


def engines(cc="9.0", trt="11.4.0.106", roles=ROLES, precision="fp16"):
    return [{"role": r, "precision": precision, "compute_capability": cc, "tensorrt_version": trt,
             "file": f"engines/{r}.engine"} for r in roles]


H100 = dict(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
TRT = dict(tensorrt_version="11.4.0.106", cuda_python=True)
ORT_GPU = dict(ort_version="1.23.0", ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
ORT_CPU = dict(ort_version="1.32.0", ort_providers=("CPUExecutionProvider",))


def test_trt_when_engines_fit():
    c = select_backend(engines(), ("fp32", "fp16"), facts=Probe(**H100, **TRT, **ORT_GPU))
    assert c.backend == "trt" and c.precision == "fp16"
    assert c.reason.startswith("trt: engines built for sm_90 with TensorRT 11.4.0.106 match this GPU")
    assert set(c.engines) == set(ROLES)
    # a different build number of the same release still fits
    c = select_backend(engines(trt="11.4.0.999"), facts=Probe(**H100, **TRT, **ORT_CPU))
    assert c.backend == "trt"


def test_engines_for_another_gpu_fall_back_to_ort_cuda():
    c = select_backend(engines(cc="8.6"), ("fp32", "fp16"), facts=Probe(**H100, **TRT, **ORT_GPU))
    assert c.backend == "ort-cuda" and c.precision == "fp16"
    assert "sm_86" in c.reason and "sm_90" in c.reason and "rebuild" in c.reason
    c = select_backend(engines(trt="10.13.0"), ("fp32",), facts=Probe(**H100, **TRT, **ORT_GPU))
    assert c.backend == "ort-cuda" and c.precision == "fp32"
    assert "TensorRT 10.13.0" in c.reason


def test_incomplete_engine_set_and_missing_libraries():
    c = select_backend(engines(roles=ROLES[1:]), facts=Probe(**H100, **TRT, **ORT_GPU))
    assert c.backend == "ort-cuda" and "no engine for image_encoder" in c.reason
    c = select_backend(engines(), facts=Probe(**H100, tensorrt_error="ModuleNotFoundError: tensorrt", **ORT_GPU))
    assert c.backend == "ort-cuda" and "TensorRT is not installed" in c.reason
    c = select_backend(engines(), facts=Probe(**H100, tensorrt_version="11.4.0", cuda_python=False, **ORT_GPU))
    assert c.backend == "ort-cuda" and "cuda-python" in c.reason


def test_cpu_fallback_and_reasons():
    c = select_backend((), ("fp32", "fp16"), facts=Probe(gpu_error="nvidia-smi not found", **ORT_CPU))
    assert c == Choice("ort-cpu", c.reason, "fp32", {}, c.rejected)
    assert c.reason.startswith("ort-cpu: onnxruntime 1.32.0 on the CPU")
    assert any("no TensorRT engines" in r for r in c.rejected)
    # a GPU without a usable GPU backend: say why it is not used
    c = select_backend((), facts=Probe(**H100, **ORT_CPU))
    assert c.backend == "ort-cpu" and "a GPU is present but ort-cuda" in c.reason


def test_explicit_requests():
    facts = Probe(**H100, **TRT, **ORT_GPU)
    assert select_backend(engines(), requested="ort-cpu", facts=facts).backend == "ort-cpu"
    assert select_backend(engines(), requested="ort-cuda", facts=facts).backend == "ort-cuda"
    assert select_backend(engines(), requested="TRT", facts=facts).backend == "trt"
    with pytest.raises(BackendError, match=r"backend 'trt' is not usable: engines were built for sm_86"):
        select_backend(engines(cc="8.6"), requested="trt", facts=facts)
    with pytest.raises(BackendError, match=r"backend 'trt' is not usable: the bundle has no TensorRT engines"):
        select_backend((), requested="trt", facts=facts)
    with pytest.raises(BackendError, match=r"has no CUDAExecutionProvider .*novic\[gpu\]"):
        select_backend((), requested="ort-cuda", facts=Probe(**ORT_CPU))
    with pytest.raises(BackendError, match="unknown backend 'tensorflow'"):
        select_backend((), requested="tensorflow", facts=facts)
    with pytest.raises(BackendError, match=r"no backend can run this bundle: onnxruntime is not installed"):
        select_backend((), facts=Probe(ort_error="ModuleNotFoundError"))


def test_errors_are_one_line():
    for req, facts in (("trt", Probe(**ORT_CPU)), ("ort-cuda", Probe(**ORT_CPU))):
        with pytest.raises(BackendError) as info:
            select_backend(engines(), requested=req, facts=facts)
        assert "\n" not in str(info.value)


def test_probe_here_never_raises():
    facts = probe()
    assert isinstance(facts, Probe)
    # onnxruntime is a test dependency; the choice on this machine is a real one
    assert select_backend((), facts=facts).backend in ("ort-cpu", "ort-cuda")


def test_probe_parts_follow_the_request():
    assert probe_parts("ort-cpu") == ("ort",)
    assert probe_parts("ort-cuda") == probe_parts("auto") == ("gpu", "ort")   # no engines: TensorRT is moot
    assert probe_parts("auto", engines()) == probe_parts("trt") == ("gpu", "trt", "ort")


def test_ort_cpu_imports_no_cuda_or_tensorrt(runtime_bundle, tmp_path):
    """`--backend ort-cpu` loads without importing cuda.bindings or tensorrt and without running
    nvidia-smi: stand-ins for all three record being touched (in a fresh process)."""
    import os
    import subprocess
    import sys

    touched = tmp_path / "touched"
    fakes = tmp_path / "fakes"
    (fakes / "cuda" / "bindings").mkdir(parents=True)
    (fakes / "cuda" / "__init__.py").write_text("")
    record = f"open({str(touched)!r}, 'a').write(__name__ + '\\n')\n"
    (fakes / "cuda" / "bindings" / "__init__.py").write_text(record)
    (fakes / "cuda" / "bindings" / "runtime.py").write_text(record)
    (fakes / "tensorrt.py").write_text(record + "__version__ = '0'\n")
    smi = fakes / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho nvidia-smi >> {touched}\nexit 1\n")
    smi.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fakes), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(fakes), os.environ["PATH"]]))
    code = ("import sys; from novic import Classifier; "
            f"clf = Classifier.load({str(runtime_bundle.bundle)!r}, backend='ort-cpu'); print(clf.backend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ort-cpu", out.stderr
    assert not touched.exists(), touched.read_text()
    # the stand-ins do work: auto probes the GPU through them
    code = "from novic.runtime.backends.select import probe; print(probe().gpu_error)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert set(touched.read_text().split()) >= {"cuda.bindings", "tensorrt", "nvidia-smi"}, out.stderr
