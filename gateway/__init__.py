"""Liutong Gateway: an API gateway for LLM model servers (see README.md and CONTRACT)."""

__version__ = "0.1.0"
