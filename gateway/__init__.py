"""An OpenAI-compatible gateway for self-hosted inference backends."""

__version__ = "0.1.0"
