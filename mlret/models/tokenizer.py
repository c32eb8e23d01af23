"""Tokenisation for the dual encoder: text -> static-shape int32 numpy arrays named after the data contract.

A thin layer over `transformers.AutoTokenizer` (fast tokenizers only). Every batch is padded to the
configured length (`padding="max_length"`) and truncated, so jit sees one shape per tower and never
recompiles. Prefixes (the paper's "Query: " / "Passage: ") are prepended to the raw text here, once, so that
training, evaluation and the exported sentence-transformers prompts all agree.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


def _check_lengths(query_len: int, passage_len: int) -> None:
    if query_len <= 0 or passage_len <= 0:
        raise ValueError(f"TextTokenizer: query_len={query_len} and passage_len={passage_len} must be positive "
                         "(config.data.query_len / config.data.passage_len)")


class TextTokenizer:
    """Queries and passages -> `{"query_ids", "query_mask"}` / `{"passage_ids", "passage_mask"}` (int32)."""

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        query_len: int,
        passage_len: int,
        query_prefix: str = "",
        passage_prefix: str = "",
    ) -> None:
        _check_lengths(query_len, passage_len)
        self.name_or_path = str(name_or_path)
        # use_fast=True: the slow (Python) tokenizers are orders of magnitude slower and differ in edge cases.
        # Importing transformers prints its advice ("PyTorch was not found ...") through its own handler, so the
        # commands import it only once their logging is routed (mlret.console.route_logging).
        import transformers  # lazy: transformers' import-time advice, after the commands route logging

        self.hf = transformers.AutoTokenizer.from_pretrained(self.name_or_path, use_fast=True)
        if not self.hf.is_fast:
            raise ValueError(f"TextTokenizer: {self.name_or_path} has no fast tokenizer (tokenizer.json); "
                             "convert it with transformers and save it with save_pretrained")
        self.query_len = int(query_len)
        self.passage_len = int(passage_len)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        backend = self.hf.backend_tokenizer
        self._loaded = (backend.truncation, backend.padding)  # what `save` writes back
        self._lock = threading.Lock()

    # One Hugging Face tokenizer for every thread, one call at a time. A fast tokenizer keeps its padding and
    # truncation settings on its Rust object and sets them at each call, so two threads tokenising queries (Lq)
    # and passages (Lp) at once would pad each other's batches to the wrong length; each call holds `_lock`. A
    # copy per thread (`copy.deepcopy`) would rebuild the model's vocabulary structures: for XLM-R's 250,002-piece
    # unigram model, 0.23 GiB of malloc'd memory per copy, two copies for the training data's two Grain threads
    # (docs/benchmarks.md, "Fifth session (issue 30): the floor"). Tokenising a step's batch takes milliseconds,
    # so the threads hardly wait; the Rust call releases the GIL and parallelises over the batch itself.

    def __getstate__(self) -> dict[str, Any]:  # pickled into Grain worker processes
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def with_lengths(self, *, query_len: int, passage_len: int, query_prefix: str = "",
                     passage_prefix: str = "") -> TextTokenizer:
        """A TextTokenizer of the same folder at other static lengths and prefixes that shares this one's Hugging
        Face tokenizer (and its lock) instead of loading a second (0.25 GiB of host memory for XLM-R's): the
        evaluation's tokenizer beside the training data's."""
        _check_lengths(query_len, passage_len)
        other = object.__new__(TextTokenizer)
        other.__dict__.update(self.__dict__)  # hf, _loaded and _lock are shared
        other.query_len, other.passage_len = int(query_len), int(passage_len)
        other.query_prefix, other.passage_prefix = query_prefix, passage_prefix
        return other

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids the tokenizer can emit, added tokens included (len(), not .vocab_size)."""
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    def _encode(self, texts: Sequence[str], prefix: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("TextTokenizer: pass a list of strings, not one string")
        texts = [prefix + t for t in texts]
        with self._lock:
            enc = self.hf(
                texts,
                # Right padding whatever the tokenizer's own side (Qwen3-Embedding's is left): packing copies each
                # text's first mask-sum tokens, and the encoders count positions from a text's first real token
                # either way (their states do not depend on the side; the export keeps the tokenizer's own).
                padding="max_length",
                padding_side="right",
                truncation=True,
                max_length=length,
                return_tensors="np",
                return_token_type_ids=False,
            )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def queries(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = self._encode(texts, self.query_prefix, self.query_len)
        return {"query_ids": ids, "query_mask": mask}

    def passages(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = self._encode(texts, self.passage_prefix, self.passage_len)
        return {"passage_ids": ids, "passage_mask": mask}

    def prompt_length(self, prefix: str) -> int:
        """Tokens a prefix occupies at the start of a text, as sentence-transformers measures a prompt for
        `include_prompt=False`: the prefix tokenised alone, less a trailing special token (EOS / SEP)."""
        if not prefix:
            return 0
        with self._lock:
            ids = self.hf([prefix])["input_ids"][0]
        return len(ids) - (1 if ids and ids[-1] in set(self.hf.all_special_ids) else 0)

    def save(self, out_dir: str | os.PathLike[str]) -> None:
        """Write the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...) into out_dir."""
        os.makedirs(out_dir, exist_ok=True)  # a local folder: mlret.export stages a gs:// export locally
        truncation, padding = self._loaded
        with self._lock:  # the settings it was loaded with, not those of the last call (tokenizer.json keeps them)
            backend = self.hf.backend_tokenizer
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)
            self.hf.save_pretrained(os.fspath(out_dir))

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.name_or_path!r}, query_len={self.query_len}, passage_len={self.passage_len}, "
                f"query_prefix={self.query_prefix!r}, passage_prefix={self.passage_prefix!r})")
