"""The runtime and the base CLI must work where torch, open_clip and onnx are not installed."""
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        BLOCKED = ("torch", "torchvision", "open_clip", "onnx", "onnxscript", "safetensors", "timm")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
""")


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "blocked" in result.stderr


def test_runtime_and_base_cli_import_without_torch():
    result = run_without_torch("""
        import importlib, pkgutil, sys
        import novic, novic.config, novic.tokens, novic.runtime
        for mod in pkgutil.walk_packages(novic.runtime.__path__, "novic.runtime."):
            importlib.import_module(mod.name)
        for name in ("run", "bench", "export", "importer", "eval"):
            importlib.import_module("novic.cli." + name)
        import novic.evaluation, novic.wordnet
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "onnx"))
        assert not leaked, leaked
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_help_without_torch():
    for name in ("run", "export", "bench", "importer", "eval"):
        result = run_without_torch(f"""
            import sys
            sys.argv = ["novic-{name}", "--help"]
            from novic.cli.{name} import main
            main()
        """)
        assert result.returncode == 0, (name, result.stderr)
        assert "Usage" in result.stdout
