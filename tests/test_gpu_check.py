"""bench/gpu_check.py end to end on the CPU (--cpu-smoke: tiny config, every section), so that the
one device call of a GPU session runs a script that is known to work. No timing is asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check
    return gpu_check


def test_cpu_smoke_runs_every_section_and_prints_one_table(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("NOVIC_BENCH_THREADS", "1")
    out = tmp_path / "out"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    results = json.loads((out / "gpu_check.json").read_text())
    assert [k for k in results if k.endswith("_error")] == []
    assert {"tokens", "encoder_graphs", "u8_encoder", "decoder_rows", "jpeg", "bench_fp32", "peer",
            "serving"} <= set(results)
    u8 = results["u8_encoder"]["fp32"]   # the tiny bundle's fused fp32 encoder and its uint8 twin
    assert u8["variant"] == "fused" and all(u8[b]["max_abs_diff"] < 1e-5 for b in ("1", "2"))
    tokens = results["tokens"]
    assert tokens["fp32"]["beam_all_equal"] == tokens["fp32"]["n"] == 6
    assert tokens["cpu_vs_oracle_equal"] == tokens["oracle_n"]
    ours, peer = results["bench_fp32"]["ours"], results["peer"]
    assert set(ours["throughput_pixels"]) == set(ours["throughput_jpeg"]) == set(peer["throughput"]) == {"1", "2"}
    assert peer["labels"] == ours["labels"][:len(peer["labels"])]   # the peer names the photos as novic does
    assert ours["host_per_call"]["calls"] >= 2
    table = (out / "summary.md").read_text()
    for row in ("tokens vs ort-cpu fp32, fp32", "preprocess + encoder fp32 fused, float / uint8 input", "one image by phase", "host work per decoder call",
                "throughput 2, from pixels", "throughput 2, from JPEG bytes", "GPU memory", "novic vs peer"):
        assert row in table, row
    assert "Sections that failed" not in table


def test_summary_names_failed_sections(gpu_check):
    results = {"machine": "Fake H100", "args": {"precisions": "fp16", "batches": "1"},
               "tokens": {"fp16": {"error": "no fp16 decoder graphs"}}, "peer_error": "Traceback ..."}
    table = gpu_check.summary(results)
    assert table.startswith("GPU: Fake H100")
    assert "| tokens, fp16 | no fp16 decoder graphs |" in table
    assert "Sections that failed (traceback in gpu_check.json): peer" in table


def test_skip_rejects_unknown_sections(gpu_check, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--skip", "tokens,warp", "--out", str(tmp_path)])
    assert "unknown sections ['warp']" in capsys.readouterr().err
