"""Remote backends (no Qt): a vLLM server running the model for our server
(`vllm.py`, with the input embeddings read alone by `embeddings.py`), and the window
writing with any KoboldAI- or OpenAI-compatible server (`client.py`). `http.py` is
their HTTP and server-sent-events client.
"""
