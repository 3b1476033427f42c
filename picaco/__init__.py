"""picaco: optimize one system prompt so an LLM honours several values at once (PICACO)."""

__version__ = "0.1.0"
