"""vllm-clasp: CLaSp (in-context layer skip) self-speculative decoding as a vLLM plugin."""

__version__ = "0.1.0"
