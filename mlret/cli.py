"""What every command does with a user's mistake: one line on stderr naming it (the flag, the config field, the
file) and exit status 2, never a traceback. `mlret.train`, `mlret.evaluate`, `mlret.export`, `mlret.mine` and
`python -m mlret.data` share it.

    app.run(main, flags_parser=cli.flags_parser("mlret.evaluate"))   # absl commands: --config.<field> overrides
    with cli.user_errors("mlret.export"):                            # the command's work
        ...

A user's mistake is what `USER_ERRORS` lists: a config field that cannot work (`mlret.errors.ConfigError`), bad
data (`DataError`), a file or folder that is not there (a model folder, a checkpoint, a data or results file).
Anything else is a bug in mlret or a library and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from absl import flags

from mlret.errors import ConfigError, DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               json.JSONDecodeError)


def message(e: BaseException) -> str:
    """The error as one line: an OSError from `open` as `FILE: reason`, a bad JSON file with its position."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
    if isinstance(e, (ConfigError, DataError)):
        return str(e)  # mlret's own messages: a list of missing files keeps one line per folder
    return " ".join(str(e).split())  # a library's message (a hub error quotes several lines) on one line


def fail(prog: str, text: str) -> None:
    """Print `prog: text` on stderr and exit with status 2 (a usage error)."""
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def user_errors(prog: str, what: str = "", also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a `USER_ERRORS` exception (or one of `also`) raised inside into `prog: [what: ]message` and exit 2."""
    try:
        yield
    except (*USER_ERRORS, *also) as e:
        fail(prog, (f"{what}: " if what else "") + message(e))


def log_path(out: str) -> str | None:
    """Where a command whose output is `out` logs: beside it, `out` without a .json / .jsonl suffix plus ".log"
    (results.json -> results.log; a folder DIR -> DIR.log, outside what it writes); None for a gs:// output."""
    if out.startswith("gs://"):
        return None
    stem = os.path.normpath(out)
    root, ext = os.path.splitext(stem)
    return (root if ext in (".json", ".jsonl") else stem) + ".log"


def check_model_folder(prog: str, flag: str, name: str | None) -> None:
    """A `--hf` value that is written as a path (or is a file) must be a folder; a hub id is checked when fetched
    (mlret.models.resolve_model_dir). Fails before anything is loaded."""
    if not name or name.startswith("gs://"):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        fail(prog, f"{flag} {name}: " + ("not a folder" if path.exists() else "no such model folder")
             + " (give a Hugging Face model folder or a hub id such as sentence-transformers/all-MiniLM-L6-v2)")


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing for `app.run(main, flags_parser=...)`, with the user's mistakes as one line: an unknown
    `--config.<field>` override (ml_collections raises a bare AttributeError/KeyError from deep inside its parser)
    with the suggestion ml_collections makes, a value of the wrong type, a config file that does not load."""
    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        except (AttributeError, KeyError) as e:
            text = str(e)
            hint = re.search(r'Did you mean \\?"([^"\\]+)\\?"', text)
            overrides = [a.split("=", 1)[0][2:] for a in argv[1:] if a.startswith("--config.")]
            # The override whose path holds the unknown key (ml_collections names the key, not the path).
            field = next((o for o in overrides for part in o.split(".")[1:]
                          if f"'{part}'" in text.replace("\\", "")), text)
            fail(prog, f"--{field}: no such config field" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
                 + "; the schema is mlret/config.py")
        except flags.Error as e:
            _check_config_loaded(prog)  # its overrides are unknown flags because the file did not load
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            # A config file whose get_config raised: absl quotes the whole traceback; its last line says why.
            fail(prog, lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}")
        _check_config_loaded(prog)
        return rest

    return parse


def _check_config_loaded(prog: str) -> None:
    """A config file that failed to load is a placeholder that raises on first use: say why now."""
    for name in ("config",):
        if name in flags.FLAGS:
            try:
                value = flags.FLAGS[name].value
            except ValueError as e:  # the file's get_config(arg) refused its argument
                fail(prog, f"--{name}: {e}")
            error = getattr(value, "_error", None)
            if isinstance(error, BaseException):
                fail(prog, f"--{name}: {_config_load_error(error)}")


def _config_load_error(error: BaseException) -> str:
    """ml_collections' report of a config file that did not load, as one line: the file and the reason."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    files = [x for x in lines if x.endswith(".py") or ".py:" in x]
    reason = lines[-1] if lines else type(error).__name__
    cause = error.__cause__ or error.__context__
    if cause is not None and not isinstance(cause, FileNotFoundError) and str(cause):
        reason = f"{type(cause).__name__}: {cause}"
    return f"{files[0]}: {reason}" if files else reason
