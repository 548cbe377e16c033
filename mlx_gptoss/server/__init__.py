"""`mlx-gptoss serve`: an OpenAI-compatible HTTP server (Responses and Chat Completions),
harmony-native. `create_app(model, tokenizer)` builds it; see docs/serving.md."""
from .app import create_app, running, serve

__all__ = ["create_app", "running", "serve"]
