"""The local OpenAI- and KoboldAI-compatible server; each soft prompt is served as a model."""
