"""Test tooling, apart from the library's training path: loop hooks that inject faults (`faults`: poisoned
batches, the SIGKILL switch), the kill -9 soak driver and the resource monitor (`soak`), and `python -m
mlret.testing.train`, mlret.train's command line with those hooks. Used by tests/ and scripts/soak.py."""
