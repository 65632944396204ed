"""Test-wide settings. No test may reach the network: the Hugging Face hub is unreachable here and
huggingface_hub would otherwise retry for tens of seconds before failing."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
