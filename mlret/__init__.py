"""mlret: multilingual dense retrievers in JAX/Flax (hybrid batch training, arXiv 2408.10536)."""

__version__ = "0.1.0"
