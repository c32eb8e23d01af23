"""mlret's error types, apart from the code that raises them (this module imports nothing of mlret).

- `ConfigError`: a config field holds a value that cannot work; the message names the field
  (`config.<section>.<field>: why`). Raised by `mlret.config.validate` before any device work.
  `ShardingError` (mesh, sharding rules, parameter placement) and `GradCacheError` (a gradient-cache chunk
  that cannot split the batch) are kinds of it.
- `DataError`: input data that cannot be used; the message names the file and line (or JSON path).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


class ShardingError(ConfigError):
    """A mesh or sharding rule that cannot work, or a large weight left replicated by mistake."""


class GradCacheError(ConfigError):
    """A gradient-cache chunk size that cannot split the global batch evenly over the devices."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line (or JSON path)."""
