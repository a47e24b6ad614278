"""Healing nodes: LoRA in each wave and the final heal. They are wired into the decay
pipeline (the wave template and its end), which is where healing happens."""
