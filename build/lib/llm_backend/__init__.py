"""llm-backend: an OpenAI-compatible, spec-first gateway for Azure OpenAI."""

__version__ = "0.1.0"
