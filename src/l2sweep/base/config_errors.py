"""Hydra's composition errors in the user's terms: the key, the value given, what is allowed.

Generic over the dataclass schema it is given, so it imports nothing from l2sweep.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import yaml
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration value is out of range; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


def override_key(override: str) -> str:
    """The key an override sets: ``+a.b=1`` -> ``a.b``, ``hydra/launcher=joblib`` -> ``hydra/launcher``."""
    return override.split("=", 1)[0].lstrip("+~")


def describe_type(tp: Any, plural: bool = False) -> str:
    """A declared type in words: ``int`` -> "an integer", ``Optional[int]`` -> "null or an integer"."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return ("null or " if len(args) < len(typing.get_args(tp)) else "") + \
            " or ".join(describe_type(a, plural) for a in args)
    words = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings")}
    if tp in words:
        return words[tp][plural]
    if typing.get_origin(tp) is list and args:
        return f"{'lists' if plural else 'a list'} of {describe_type(args[0], True)}"
    if typing.get_origin(tp) is dict and len(args) == 2:
        return f"a mapping of {describe_type(args[0], True)} to {describe_type(args[1], True)}"
    if dataclasses.is_dataclass(tp):
        return f"a section with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return str(tp)


def _schema_type(schema: type, key: str) -> Any:
    """The declared type of ``key`` (``train.epochs`` -> int), or None if the schema lacks it."""
    tp: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _unknown_key(schema: type, key: str) -> Optional[str]:
    """What is allowed instead of the unknown ``key`` (the nearest declared key, else the list),
    or None when the schema declares every part of it or leaves it free (dataset.sha256)."""
    tp: Any = schema
    known: list[str] = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            break
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = (f"did you mean {'.'.join(known + close)!r}?" if close else
                    f"keys{' of ' + '.'.join(known) if known else ''}: {', '.join(names)}")
            return f"a key the schema declares ({'.'.join(known + [part])!r} is unknown; {hint})"
        known.append(part)
        tp = typing.get_type_hints(tp)[part]
    return None


def _undeclared(node: Any, schema: Any, prefix: str = "") -> Optional[tuple[str, Any]]:
    """The first key (and its value) of the plain mapping ``node`` that ``schema`` does not
    declare; below a field typed ``dict`` anything goes (dataset.sha256)."""
    if not dataclasses.is_dataclass(schema) or not isinstance(node, dict):
        return None
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key not in hints:
            return name, value
        found = _undeclared(value, hints[key], f"{name}.")
        if found:
            return found
    return None


def check_declared(cfg: Any, schema: type) -> None:
    """Refuses a composed config with a key ``schema`` does not declare. Hydra's ``+key=value``
    (and ``++``) adds a key even to a typed config, so a ``+train.epoch=3`` would be silently
    ignored; here it fails like a misspelt ``train.epoch=3``, with the nearest declared key.

    Raises:
        ConfigError: naming the first unknown key, its value and what is allowed.
    """
    found = _undeclared(OmegaConf.to_container(cfg, resolve=False), schema)
    if found:
        key, value = found
        raise ConfigError(key, value, _unknown_key(schema, key) or "a key the schema declares")


def _override_value(overrides: list[str], key: str) -> Any:
    for o in reversed(overrides):
        if override_key(o) == key:
            text = o.split("=", 1)[1] if "=" in o else ""
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return text
    return None


def compose_error(error: BaseException, overrides: list[str], schema: type) -> BaseException:
    """Hydra's composition error as a :class:`ConfigError`: for an unknown group option, an
    unknown key (suggesting the nearest one ``schema`` declares) or a value of the wrong type.
    Anything else is returned unchanged."""
    cause = error.__cause__
    if isinstance(error, OverrideParseException) and "=" in (error.override or ""):
        key, _, text = error.override.partition("=")
        reason = str(error).split("See https://", 1)[0].strip()
        return ConfigError(key, text, f"Hydra's override grammar ({reason})")
    if isinstance(error, MissingConfigException) and error.options is not None \
            and "/" in (error.missing_cfg_file or ""):
        group, _, choice = error.missing_cfg_file.rpartition("/")
        return ConfigError(group, choice, f"one of {', '.join(sorted(error.options))}")
    match = re.search(r"Could not override '([^']+)'", str(error))
    key = match.group(1) if match and not match.group(1).startswith("hydra.") else None
    allowed = _unknown_key(schema, key) if key else None
    if allowed and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(key, _override_value(overrides, key), allowed)
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, ValidationError) and full_key:
        item = re.fullmatch(r"(.+)\[\d+\]", full_key)
        tp = _schema_type(schema, item.group(1) if item else full_key)
        if item and typing.get_origin(tp) is typing.Union:  # Optional[list[...]]: the list's
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if item and typing.get_args(tp):
            tp = typing.get_args(tp)[0]
        if tp is not None:
            return ConfigError(full_key, cause.value, describe_type(tp))
    return error


@contextmanager
def explained(overrides: list[str], schema: type) -> Iterator[None]:
    """Re-raises Hydra's composition errors as :func:`compose_error` explains them."""
    try:
        yield
    except (HydraException, OmegaConfBaseException) as exc:
        error = compose_error(exc, overrides, schema)
        if error is exc:
            raise
        raise error from exc
