"""Exports of a (compressed) model: GGUF for llama.cpp, safetensors, packed forms."""
