"""The model side of mlret: tokenizer, Flax NNX dual encoder, Hugging Face weight import."""

from mlret.models.tokenizer import TextTokenizer

__all__ = ["TextTokenizer"]
