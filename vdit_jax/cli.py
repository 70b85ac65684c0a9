"""Shared bits of the thin command-line tools: one clear line and exit code 2 for bad input.

Every CLI runs `app.run(main, flags_parser=cli.parse_flags)` and calls its logic through `run_guarded`, so a bad
flag, config file, config override or config value is one `error: ...` line on stderr and exit code 2, while a bug
keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import NoReturn


class UsageError(ValueError):
    """Bad user input to a CLI; printed as one line, exit code 2."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


_HELP = re.compile(r"--?(help|helpshort|helpfull|helpxml|\?)")
_CONFIG_FILE_ERROR = ": Error whilst parsing config file:"


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parser (`app.run(main, flags_parser=cli.parse_flags)`), but a bad flag, a config file that does
    not load and an override of a config key that does not exist are one line and exit code 2, and `--help` exits
    0 after the usage (absl: 1)."""
    from absl import flags

    try:
        rest = flags.FLAGS(list(argv))
    except flags.Error as e:
        fail(_flag_error_line(str(e)))
    except (AttributeError, KeyError) as e:  # ml_collections: --config.a.b=... names a key the config lacks
        message = _unknown_override(argv, e)
        if message is None:
            raise
        fail(message)
    except OSError as e:  # ml_collections: an override of a config file that did not load
        fail(f"could not load the config file: {_last_line(str(e))}")
    except SystemExit as e:
        if e.code == 1 and any(_HELP.fullmatch(a) for a in argv[1:]):
            raise SystemExit(0) from None
        raise
    for name in flags.FLAGS:  # a config file that did not load only says so when read: read it now
        try:
            getattr(flags.FLAGS[name].value, "keys", None)
        except OSError as e:
            fail(f"--{name}: could not load the config file: {_last_line(str(e))}")
    return rest


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _flag_error_line(text: str) -> str:
    """One line for absl's flags.Error (a config file's exception arrives with its whole traceback)."""
    first = text.strip().splitlines()[0] if text.strip() else "bad flags"
    required = re.search(r"Flag (--\S+) must have a value other than None", first)
    if required:
        return f"{required.group(1)} is required; see --help"
    if first.endswith(_CONFIG_FILE_ERROR):  # "flag --config=PATH: Error whilst parsing config file:" + traceback
        flag = first.removeprefix("flag ").removesuffix(_CONFIG_FILE_ERROR)
        return f"{flag}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', _last_line(text))}"
    return _last_line(text).removeprefix("flag ")


def _unknown_override(argv: Sequence[str], error: Exception) -> str | None:
    """`--config.a.b=...: unknown config key 'b'; did you mean ...` when `error` is ml_collections refusing a key
    that one of the overrides in argv names, else None (a bug: it keeps its traceback)."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(message))
        error = error.args[0]
    lines = str(error.args[0] if error.args else error).splitlines()
    key = lines[0].strip("'\"") if lines else ""
    hint = " ".join(lines[1:]).replace("Did you mean", "did you mean")
    for arg in argv[1:]:
        match = re.match(r"--?(?:no)?(\w+(?:\.\w+)+)(=.*)?$", arg)
        if key and match and key in match.group(1).split(".")[1:]:
            return f"{arg}: unknown config key {key!r}" + (f"; {hint}" if hint else "")
    return None


# A path the user gave that does not work: named in the message, not a bug.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_guarded(fn, *args, **kwargs):
    """Runs fn, turning user errors (bad config, bad flag values, missing files, a file where a directory should be,
    no permission) into one line and exit 2."""
    from vdit_jax.config import ConfigError

    try:
        return fn(*args, **kwargs)
    except (UsageError, ConfigError, *_PATH_ERRORS) as e:
        fail(str(e))


def setup_logging() -> None:
    """INFO logging for our own messages; libraries that log every checkpoint detail at INFO are kept to WARNING."""
    import logging as std_logging

    from absl import logging

    logging.set_verbosity(logging.INFO)
    noisy = ("/orbax/", "/grain/", "/tensorstore/", "/etils/")

    class _Quiet(std_logging.Filter):
        def filter(self, record):
            return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().addFilter(_Quiet())
    std_logging.getLogger().addFilter(_Quiet())
