"""How every entry point reports failure: one ``error:`` line and an exit status.

``prepare``, ``train``, ``evaluate`` and ``gate`` share this, so a user's typo reads the same
everywhere::

    error: train.epochs='abc' is not allowed: an integer
    error: params.yaml: trian.epochs=3 is not allowed: a key the schema declares ('trian' is unknown; did you mean 'train'?)

Add ``--verbose`` (or set ``HYDRA_FULL_ERROR=1``) to get the traceback instead.

Exit statuses: 0 success; 1 a failure while working (a job failed, the disk filled up, the
tracking server went away); 2 bad input (configuration, params.yaml, data files) found before
anything was written; 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional, Sequence

from l2sweep.base import compat
from l2sweep.base.signals import Terminated, signal_of

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Flags that ask for the traceback; entry points remove them before parsing their arguments.
VERBOSE_FLAGS = ("--verbose", "-v")


def wants_traceback(args: Sequence[str]) -> bool:
    """Whether the user asked for tracebacks (``--verbose``/``-v`` or ``HYDRA_FULL_ERROR=1``)."""
    return any(a in VERBOSE_FLAGS for a in args) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def strip_verbose(args: Sequence[str]) -> list[str]:
    """``args`` without the verbose flags."""
    return [a for a in args if a not in VERBOSE_FLAGS]


def one_line(error: BaseException) -> str:
    """An exception's message on one line, with Hydra's cause and without its search-path dump."""
    from hydra.errors import HydraException

    text = str(error).split("Config search path:")[0]
    cause = error.__cause__  # Hydra's own message often leaves the reason to its cause
    if isinstance(error, HydraException) and cause is not None and str(cause) and \
            str(cause).splitlines()[0] not in text:
        text = f"{text}: {str(cause).splitlines()[0]}"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(error).__name__


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (exit 2): config, params.yaml, data files."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from l2sweep.base.config import ConfigError
    from l2sweep.base.data import DataError

    return (ConfigError, DataError, HydraException, OmegaConfBaseException, yaml.YAMLError)


def _params_keys() -> tuple[str, set[str]]:
    """The params file's name and the keys it sets (``model`` for ``model: {name: ...}``)."""
    from l2sweep.base.config import load_params, override_key, params_file, params_overrides

    path = params_file()
    if path is None:
        return "", set()
    try:
        return str(path), {override_key(o) for o in params_overrides(load_params(path))}
    except Exception:  # a broken params file is reported by whoever reads it
        return str(path), set()


def describe(error: BaseException, args: Sequence[str] = ()) -> str:
    """The one-line message for ``error``.

    A :class:`~l2sweep.base.config.ConfigError` about a key that params.yaml sets (and ``args``, the
    command line, does not) is prefixed with the params file, so the user knows where to look.
    """
    import yaml

    from l2sweep.base.config import ConfigError, override_key

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


def interrupted_status(error: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signal_of(error)


def report(error: BaseException, args: Sequence[str] = (), *, verbose: bool = False) -> int:
    """Prints ``error: <one line>`` to stderr and returns the exit status it calls for.

    With ``verbose`` it re-raises instead (call it from an ``except`` block).
    """
    if verbose:
        raise error
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        print(f"error: interrupted ({signal_of(error).name}); run the command again "
              "(or `dvc repro`) to finish", file=sys.stderr)
        return interrupted_status(error)
    print(f"error: {describe(error, args)}", file=sys.stderr)
    return EXIT_USAGE if isinstance(error, user_errors()) else EXIT_FAILURE


def entry_point(*expected: type[BaseException]) -> Callable[[Callable[[list[str]], Any]],
                                                            Callable[[Optional[Sequence[str]]], Any]]:
    """Decorator for a stage's ``main(args)``: one ``error:`` line instead of a traceback.

    The wrapped ``main(argv=None)`` reads ``sys.argv[1:]`` when ``argv`` is None, removes
    ``--verbose``/``-v`` and calls the function with the rest. Bad input (see
    :func:`user_errors`, plus the ``expected`` types) returns :data:`EXIT_USAGE`, any other
    error :data:`EXIT_FAILURE`, an interrupt 130/143; the function's own return value (an
    exit status, or None for 0) passes through.

    Example:
        >>> @entry_point(EvaluateError)
        ... def main(args: list[str]) -> int:
        ...     evaluate(compose_config(args))
        ...     return 0
    """

    def decorate(main: Callable[[list[str]], Any]) -> Callable[[Optional[Sequence[str]]], Any]:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> Any:
            args = list(sys.argv[1:] if argv is None else argv)
            verbose = wants_traceback(args)
            args = strip_verbose(args)
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
    """Runs a command's ``main()`` and ends the process with its status, skipping the
    interpreter's teardown.

    Everything a normal exit does that matters is done first, in the interpreter's order:
    threading's exit hooks run and non-daemon threads are joined, ``atexit`` handlers run
    (MLflow ends a run left active, ``logging`` flushes its files), and the standard streams
    are flushed. What is skipped is the destruction of every module
    and object, which with TensorFlow and MLflow loaded takes seconds and writes nothing.
    An exception other than ``SystemExit`` (``--verbose`` re-raises)
    takes Python's normal path, so its traceback is printed as usual.

    Example:
        >>> if __name__ == "__main__":
        ...     exit_fast(main)
    """
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
