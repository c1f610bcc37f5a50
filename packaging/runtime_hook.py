"""Runs first inside the bundle: settings that only make sense frozen."""

import os

# The bundle ships its tokenizers; their thread pool misbehaves after fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No telemetry calls from a desktop app.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
