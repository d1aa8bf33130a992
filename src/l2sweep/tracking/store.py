"""The MLflow store: which one (:func:`tracking_uri`), whether it can be used (:func:`check_store`,
before any job trains), and its one-time set-up (:func:`ensure_store`).
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from l2sweep.base import files
from l2sweep.base.config_errors import ConfigError

#: MLflow's HTTP defaults (7 retries, 120 s timeout) let a dead server hang a run for minutes;
#: these give up in seconds. Exported to the environment, so launcher workers get them too.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  #: model training, not GenAI


class StoreError(RuntimeError):
    """The MLflow store cannot be used; the message names it and says why."""


def apply_http_defaults() -> None:
    """Sets :data:`HTTP_DEFAULTS` in the environment where the user has not."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def tracking_uri(cfg: DictConfig, recorded: Optional[str] = None) -> str:
    """The store: ``MLFLOW_TRACKING_URI``, else ``recorded`` (the one a sweep logged to, for
    ``evaluate``; if redacted, see :func:`unmasked`), else ``tracking.uri``; a relative local one
    in :func:`origin`, if any."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or unmasked(recorded, cfg.tracking.uri) or cfg.tracking.uri
    folder, root = local_folder(uri), origin()
    if root is None or folder is None or folder.is_absolute():
        return uri
    return f"sqlite:///{root / sqlite_path(uri)}" if sqlite_path(uri) else str(root / folder)


#: What stands for a credential in a URI that is written or logged (:func:`redact`).
MASK = "***"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#'\"]*@")
_SECRET_PARAM = re.compile(r"(?i)(?<![\w.-])([\w.-]*(?:password|passwd|pwd|secret|token|api_?key))"
                           r"=[^\s&;#'\"]*")


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it masked: the user info
    (``http://user:token@host`` -> ``http://***@host``) and password-like parameters
    (``postgresql://host/db?password=pw`` -> ``...?password=***``). Applied to every URI, error
    and config text that goes to an output, a log line, a tag or an artifact."""
    return _SECRET_PARAM.sub(rf"\1={MASK}", _USERINFO.sub(rf"\1{MASK}@", text))


def unmasked(recorded: Optional[str], configured: str) -> Optional[str]:
    """A recorded store URI that can be connected to: as recorded, or ``configured`` where the
    recorded one is its :func:`redact`-ed form.

    Raises:
        StoreError: ``recorded`` was redacted and ``configured`` is another store.
    """
    if not recorded or MASK not in recorded:
        return recorded
    if redact(configured) == recorded:
        return configured
    raise StoreError(f"the sweep logged to the MLflow store {recorded}, recorded without its credentials; "
                     "set MLFLOW_TRACKING_URI (or tracking.uri) to that store, credentials included")


def hide_credentials(uri: str) -> None:
    """Keeps MLflow from printing ``uri`` ("View run ... at: <uri>") as a run ends, where it holds
    credentials (MLflow prints the URI verbatim)."""
    if redact(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def origin() -> Optional[Path]:
    """The user's repository (``DVC_ROOT``) when a DVC experiment runs in a copy of it, else None:
    relative stores live there, not in the copy DVC deletes afterwards."""
    root = os.environ.get("DVC_ROOT")
    return Path(root) if root and Path(root).resolve() != Path.cwd().resolve() else None


def artifact_location(cfg: DictConfig) -> Optional[str]:
    """A new experiment's artifact root: MLflow's default (None), except for sqlite in
    :func:`origin`'s case: that repository's ``mlruns/``."""
    root = origin()
    if root is None or sqlite_path(tracking_uri(cfg)) is None:
        return None
    return (root.resolve() / "mlruns" / cfg.tracking.experiment).as_uri()


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def local_folder(uri: str) -> Optional[Path]:
    """The folder of a local store or artifact URI (``sqlite:///``, ``file://`` or a path)."""
    db = sqlite_path(uri)
    if db is not None:
        return db.parent
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri and "://" not in uri and ":" not in uri.split("/", 1)[0]:
        return Path(uri)
    return None


def store_error(uri: str, error: BaseException) -> str:
    """One line on why the store at ``uri`` failed (for a silent server: the settings that bound the wait)."""
    uri, text = redact(uri), redact(" ".join(str(error).split()) or type(error).__name__)
    if not uri.startswith(("http://", "https://")) or "failed with exception" not in text:
        return f"MLflow store {uri}: {text}"  # not a connection failure (the server answered)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out|Connection aborted"
                      r"|too many \d+ error responses)", text)
    reason = (match.group(1) or match.group(2)).strip() if match else "no answer"
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    return (f"MLflow tracking server {uri} does not answer ({reason}; gave up after {retries} "
            f"retries of {timeout} s: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT); "
            "start it, or set MLFLOW_TRACKING_URI / tracking.uri to a store that works")


def check_store(cfg: DictConfig) -> None:
    """The store can be written (local) or answers (a server), before any job trains.

    For sqlite only what needs no MLflow is checked (MLflow starts on the tracking thread);
    other stores are set up here, before parallel jobs could race to create them.

    Raises:
        StoreError: naming the store and the reason.
        l2sweep.base.files.OutputError: its folder cannot be written or the disk is full.
        l2sweep.base.config_errors.ConfigError: a sqlite URI names a folder, not a database file.
    """
    uri = tracking_uri(cfg)
    check_sqlite_file(cfg, uri)
    folder = local_folder(uri)
    if folder is not None:
        files.check_writable(folder, f"the MLflow store ({uri})")
        files.check_free_space(folder, f"the MLflow store ({uri})")
        if sqlite_path(uri) is not None:
            check_sqlite(uri)
            return
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        ensure_store(cfg)
    except (files.OutputError, StoreError):
        raise
    except Exception as exc:  # MLflow raises many kinds; all mean the same here
        raise StoreError(store_error(uri, exc)) from exc


def check_sqlite_file(cfg: DictConfig, uri: str) -> None:
    """A sqlite store ``uri`` does not name an existing folder (sqlite could only say "unable to
    open database file", and only once the first λ has trained).

    Raises:
        ConfigError: naming the setting that gave ``uri`` (MLFLOW_TRACKING_URI or tracking.uri).
    """
    db = sqlite_path(uri)
    if db is None or not db.is_dir():
        return
    key = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    given = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    raise ConfigError(key, given, f"a sqlite database file, but {db} is a folder "
                                  f"(e.g. sqlite:///{sqlite_path(given) or db}/mlflow.db)")


def check_server(uri: str, timeout: float = 10.0) -> None:
    """A tracking server answers on ``uri`` (any HTTP answer will do)."""
    try:
        # Without the user info: urllib takes it for part of the host name; /health needs no login.
        urllib.request.urlopen(_USERINFO.sub(r"\1", uri).rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        reason = getattr(reason, "strerror", None) or reason  # "Connection refused", not "[Errno 111] ..."
        raise StoreError(f"MLflow tracking server {redact(uri)} does not answer ({reason}); start it, "
                         "or set tracking.uri / MLFLOW_TRACKING_URI to a store that works") from exc


def check_sqlite(uri: str) -> None:
    """An existing sqlite store is a database sqlite can read (no MLflow needed)."""
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return  # created on first use
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(store_error(uri, exc)) from exc


def check_artifact_root(uri: str, location: Optional[str]) -> None:
    """The artifact root of the store at ``uri`` can be written, where it is a local folder."""
    artifacts = local_folder(location or "")
    if artifacts is not None and artifacts != local_folder(uri):
        files.check_writable(artifacts, f"MLflow artifacts ({location})")
        files.check_free_space(artifacts, f"MLflow artifacts ({location})")


def get_client(cfg: DictConfig, recorded: Optional[str] = None) -> Any:
    """An ``MlflowClient`` for the configured store (with :data:`HTTP_DEFAULTS` applied)."""
    from mlflow import MlflowClient

    apply_http_defaults()
    return MlflowClient(tracking_uri=tracking_uri(cfg, recorded))


def ensure_store(cfg: DictConfig) -> str:
    """Creates the store (schema, WAL journal) and the experiment once, checks its artifact
    root; returns the experiment's id. A lock on a sqlite database's folder keeps two new
    sweeps from creating its schema at once ("table ... already exists")."""
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is None:
        return _ensure_experiment(cfg)
    db.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        # WAL lets readers (the UI) and parallel jobs' writers proceed without "database is
        # locked"; the journal mode is stored in the database file, so once is enough.
        with closing(sqlite3.connect(db, timeout=30)) as con:
            con.execute("PRAGMA journal_mode=WAL")
        return _ensure_experiment(cfg)
    finally:
        os.close(folder)  # releases the lock


def _ensure_experiment(cfg: DictConfig) -> str:
    from mlflow.exceptions import MlflowException

    client = get_client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        try:
            client.create_experiment(cfg.tracking.experiment, artifact_location(cfg),
                                     tags=dict([EXPERIMENT_KIND]))
        except MlflowException:
            pass  # another process created it between our look-up and create
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if EXPERIMENT_KIND[0] not in experiment.tags:  # created by an older version or by hand
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    check_artifact_root(tracking_uri(cfg), experiment.artifact_location)
    return experiment.experiment_id
