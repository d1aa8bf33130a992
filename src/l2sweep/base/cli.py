"""How every entry point (:func:`entry_point`) reports failure: one ``error:`` line and a status.

``--verbose`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback instead. Exit statuses: 0 success,
1 a failure while working, 2 bad input (config, params.yaml, data files), 130/143 SIGINT/SIGTERM.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

import yaml
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from l2sweep.base import compat
from l2sweep.base.config import ConfigError, load_params, override_key, params_file, params_overrides
from l2sweep.base.data import DataError
from l2sweep.base.signals import Terminated, signal_of

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Flags that ask for the traceback; removed before the arguments are parsed.
VERBOSE_FLAGS = ("--verbose", "-v")
HELP_FLAGS = ("--help", "-h")
VERBOSE_ENV = "L2SWEEP_VERBOSE"  # "1": a --verbose stage, for its worker processes too
#: Every stage's log format (conf/config.yaml repeats it); the quiet loggers: INFO only with --verbose.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
QUIET_LOGGERS = ("mlflow", "alembic", "sqlalchemy")
#: Those of them whose INFO lines ``--verbose`` brings back (sqlalchemy's echo every SQL statement).
VERBOSE_LOGGERS = ("mlflow", "alembic")
#: TensorFlow's start-up notices (absl's, oneDNN's, CPU and CUDA plugin ones), printed on load.
TF_STARTUP_NOISE = re.compile(r"absl::InitializeLog|oneDNN custom operations|binary is optimized to use|Unable"
                              r" to register cu\w+ factory|computation placer|TF-TRT Warning|cuda drivers")


def wants_traceback(args: Sequence[str]) -> bool:
    """Whether the user asked for tracebacks (``--verbose``/``-v`` or ``HYDRA_FULL_ERROR=1``)."""
    return any(a in VERBOSE_FLAGS for a in args) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def strip_verbose(args: Sequence[str]) -> list[str]:
    """``args`` without the verbose flags."""
    return [a for a in args if a not in VERBOSE_FLAGS]


def setup_logging(verbose: bool = False) -> None:
    """INFO to stderr in :data:`LOG_FORMAT`; ``verbose``: :data:`VERBOSE_LOGGERS` and TensorFlow too."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose and name in VERBOSE_LOGGERS
                                         else logging.WARNING)


def import_tensorflow() -> None:
    """Imports TensorFlow without :data:`TF_STARTUP_NOISE` (fd 2 is captured meanwhile) and its
    C++ chatter (``TF_CPP_MIN_LOG_LEVEL``); with :data:`VERBOSE_ENV` set, as is."""
    if "tensorflow" in sys.modules or os.environ.get(VERBOSE_ENV) == "1":
        import tensorflow  # noqa: F401
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        lines = captured.read().decode(errors="replace").splitlines()
    kept = [line for line in lines if not TF_STARTUP_NOISE.search(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)


def one_line(error: BaseException) -> str:
    """An exception's message on one line, with Hydra's cause and without its search-path dump."""
    text = str(error).split("Config search path:")[0]
    cause = error.__cause__  # Hydra's own message often leaves the reason to its cause
    if isinstance(error, HydraException) and cause is not None and str(cause) and \
            str(cause).splitlines()[0] not in text:
        text = f"{text}: {str(cause).splitlines()[0]}"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(error).__name__


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (exit 2): config, params.yaml, data files."""
    return (ConfigError, DataError, HydraException, OmegaConfBaseException, yaml.YAMLError)


def _params_keys() -> tuple[str, set[str]]:
    """The params file's name and the keys it sets (``model`` for ``model: {name: ...}``)."""
    path = params_file()
    if path is None:
        return "", set()
    try:
        return str(path), {override_key(o) for o in params_overrides(load_params(path))}
    except Exception:  # a broken params file is reported by whoever reads it
        return str(path), set()


def describe(error: BaseException, args: Sequence[str] = ()) -> str:
    """The one-line message for ``error``, naming params.yaml if it (not ``args``) set the bad key."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{mark.name}:{mark.line + 1}: not valid YAML: {error.problem}"
    text = one_line(error)
    if isinstance(error, ConfigError):
        cli_keys = {override_key(a) for a in args if not a.startswith("-")}
        name, keys = _params_keys()
        key = str(error.key).split("[", 1)[0]
        if name and key not in cli_keys and any(key == k or key.startswith(f"{k}.") or
                                                k.startswith(f"{key}.") for k in keys):
            return f"{name}: {text}"
    elif not (isinstance(error, (OSError, *user_errors())) or
              type(error).__module__.startswith(("l2sweep.", "__main__"))):
        # Not one of ours: keep the type, it is often the only clue.
        text = f"{type(error).__name__}: {text}"
    return text


def report(error: BaseException, args: Sequence[str] = (), *, verbose: bool = False) -> int:
    """Prints ``error: <one line>`` and returns the exit status; ``verbose``: re-raises instead."""
    if verbose:
        raise error
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        print(f"error: interrupted ({signal_of(error).name}); run the command again "
              "(or `dvc repro`) to finish", file=sys.stderr)
        return 128 + signal_of(error)
    print(f"error: {describe(error, args)}", file=sys.stderr)
    return EXIT_USAGE if isinstance(error, user_errors()) else EXIT_FAILURE


def entry_point(*expected: type[BaseException]) -> Callable[[Callable[[list[str]], Any]],
                                                            Callable[[Optional[Sequence[str]]], Any]]:
    """Decorator for a stage's ``main(args)``: passes ``argv`` (default ``sys.argv[1:]``) without
    the verbose flags, turns an error into one ``error:`` line and its status (``expected`` types:
    :data:`EXIT_USAGE`); ``-h``/``--help`` prints the stage module's docstring."""

    def decorate(main: Callable[[list[str]], Any]) -> Callable[[Optional[Sequence[str]]], Any]:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> Any:
            args = list(sys.argv[1:] if argv is None else argv)
            verbose = wants_traceback(args)
            args = strip_verbose(args)
            setup_logging(verbose)
            if any(a in HELP_FLAGS for a in args):
                print(sys.modules[main.__module__].__doc__.strip())
                return EXIT_OK
            try:
                return main(args)
            except (Exception, KeyboardInterrupt, Terminated) as exc:
                status = report(exc, args, verbose=verbose)
                if isinstance(exc, expected):
                    status = EXIT_USAGE
                return status

        return run

    return decorate


def exit_fast(main: Callable[[], Any]) -> None:
    """Runs ``main()`` and exits with its status after the exit hooks, ``atexit`` handlers and
    flushes, skipping the destruction of every object (seconds with TensorFlow loaded)."""
    try:
        result = main()
    except SystemExit as exc:
        result = exc.code
    if result is None:
        code = 0
    elif isinstance(result, int):
        code = result
    else:  # SystemExit("message"): Python prints it and exits 1
        print(result, file=sys.stderr)
        code = 1
    compat.run_exit_hooks()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to write
            pass
    os._exit(code)
