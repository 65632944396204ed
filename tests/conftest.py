"""Test-wide settings. No test may reach the network: the Hugging Face hub is unreachable here and
huggingface_hub would otherwise retry for tens of seconds before failing."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ModelOpt lives in its own venv (scripts/modelopt-venv.sh); the ModelOpt tests use the one at the
# conventional place when NOVIC_MODELOPT_PYTHON does not name another (.ci/run creates it).
_MODELOPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".modelopt-venv", "bin", "python")
if os.path.exists(_MODELOPT):
    os.environ.setdefault("NOVIC_MODELOPT_PYTHON", _MODELOPT)
