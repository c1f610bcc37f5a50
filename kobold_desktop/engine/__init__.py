"""Model loading and generation (no Qt)."""
