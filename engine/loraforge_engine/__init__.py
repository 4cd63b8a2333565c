"""loraforge-engine: LoRA training numerics for loraforge (PyTorch + diffusers + peft).

Run as ``python -m loraforge_engine <command>``; see engine/README.md.
"""

__version__ = "0.1.0"
