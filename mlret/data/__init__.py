"""mlret's input side: parallel units, readers, TFDS builders, the hybrid batch schedule and the Grain
pipeline.

Light names (the unit contract, LANGUAGES, the schedule) import eagerly; the TFDS builders and the Grain
pipeline load on first use, so that `mlret.config.validate` and the schedule stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

from mlret.data.schedule import BatchPlan, HybridSchedule, ScheduleSpec, UnitIndex
from mlret.data.units import (
    CROSS_LINGUAL,
    LANG_INDEX,
    LANGUAGES,
    MONOLINGUAL,
    BadRecords,
    LangText,
    ParallelUnit,
    lang_index,
)
from mlret.errors import DataError

_LAZY = {
    "make_train_iterator": "mlret.data.pipeline",
    "make_schedule": "mlret.data.pipeline",
    "load_sources": "mlret.data.pipeline",
    "BatchAssembler": "mlret.data.pipeline",
    "readers": "mlret.data.readers",
    "tfds_builders": "mlret.data.tfds_builders",
    "pipeline": "mlret.data.pipeline",
}

__all__ = ["BadRecords", "BatchPlan", "CROSS_LINGUAL", "DataError", "HybridSchedule", "LANGUAGES", "LANG_INDEX",
           "LangText", "MONOLINGUAL", "ParallelUnit", "ScheduleSpec", "UnitIndex", "lang_index", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if _LAZY[name].endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'mlret.data' has no attribute {name!r}")
