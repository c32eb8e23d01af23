"""Named plug-in records: what `mlret.eval.registry` (evaluators) and `mlret.data.kinds` (training-source kinds)
keep theirs in. Imports nothing of mlret."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(dict[str, T], Generic[T]):
    """A dict from name to record, in registration order, where a name is registered once."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what  # "evaluator", "source kind": for messages

    def register(self, record: T) -> T:
        if record.name in self and self[record.name] is not record:
            raise ValueError(f"a {self.what} named {record.name!r} is already registered ({self[record.name]})")
        self[record.name] = record
        return record
