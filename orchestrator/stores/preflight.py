"""Checks of a sweep's names, paths and stores, made before Ray starts or anything is recorded
(the Ray cluster's address is checked by :func:`orchestrator.tuning.cluster.check_ray_address`),
and of the port a web UI is to listen on.

Every check returns or raises :class:`ConfigError` with one line naming the option, its
(masked) value and the problem. Network checks are bounded by :data:`CONNECT_TIMEOUT_S`, so
an unreachable service is reported within seconds instead of after the clients' own retries
(minutes for MLflow's HTTP client and for Ray's GCS client). Nothing here creates a file,
a database table or a Ray process.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy

from orchestrator.entities.credentials import mask
from orchestrator.entities.sweep import SweepRecord
from trainer.config import ConfigError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "check_existing_store",
    "check_name",
    "check_new_sweep",
    "check_output_dir",
    "check_port_free",
    "check_stores",
    "check_study_of",
    "check_study_storage",
    "check_tracking_uri",
    "check_writable_dir",
    "error_reason",
    "sqlite_file",
]

CONNECT_TIMEOUT_S = 3.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HTTP = ("http", "https")
_TRACKING_ENGINES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's DATABASE_ENGINES
_STUDY_ENGINES = ("sqlite", "postgresql", "mysql")


def error_reason(err: BaseException) -> str:
    """Why `err` happened, in a few words: the OS error at the bottom of its chain
    ("Connection refused") if there is one, else its first line."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, TimeoutError | socket.timeout):
            return "timed out"
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
        cause = cause if isinstance(cause, BaseException) else None
    text = str(getattr(err, "orig", None) or err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip(".")


def check_name(name: str, option: str) -> None:
    """A sweep's name, or a registered model's (`--register`): MLflow would take more, but a
    space or a quote would break the `models:/NAME@champion` commands printed for it."""
    if not _NAME.match(name):
        raise ConfigError(
            f"{option} is {name!r}, but must be 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _creatable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a writable directory, or None. Writing is tried (an
    empty directory made and removed at once): `os.access` lets root through where the
    kernel refuses it all the same (/proc, /sys)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".writable-").cleanup()
    except OSError:
        return f"{existing} is not writable"
    return None


def check_writable_dir(path: str | Path, option: str) -> Path:
    """The absolute directory `path` (the sweep storage, or a command's `--output`), which
    must be (or become) a writable directory."""
    directory = Path(path).expanduser().resolve()
    if problem := _creatable_dir_problem(directory):
        raise ConfigError(f"{option} is {str(path)!r}, but {problem}")
    return directory


def check_output_dir(output: str | Path | None, record: SweepRecord) -> Path:
    """Where a command on `record` writes: its `--output` (checked as
    :func:`check_writable_dir` checks it), else the sweep's directory."""
    return check_writable_dir(output, "--output") if output else record.directory


def _scheme(url: str) -> str:
    return url.partition("://")[0].split("+")[0].lower() if "://" in url else ""


def sqlite_file(url: str) -> Path:
    """The database file of a ``sqlite:///PATH`` URL (relative paths are relative to the
    working directory)."""
    return Path(url.partition("://")[2].removeprefix("/")).expanduser()


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _check_sqlite(url: str, option: str) -> None:
    """An existing SQLite database, or a file that can be created; nothing is left here."""
    if url.partition("://")[2].removeprefix("/") in ("", ":memory:"):
        raise ConfigError(f"{option} is {url!r}, but an in-memory database keeps nothing")
    path = sqlite_file(url)
    if not path.exists():
        if problem := _creatable_dir_problem(path.resolve().parent):
            raise ConfigError(f"{option} is {url!r}, but {problem}")
        return
    if not path.is_file():
        raise ConfigError(f"{option} is {url!r}, but {path} is not a file")
    try:
        with contextlib.closing(_read_only(path)) as db:
            db.execute("PRAGMA schema_version")
    except sqlite3.Error as err:
        raise ConfigError(f"{option} is {url!r}, but {path}: {error_reason(err)}") from None


def _engine(url: str) -> sqlalchemy.engine.Engine:
    timeout = {"connect_timeout": int(CONNECT_TIMEOUT_S)}
    return sqlalchemy.create_engine(url, connect_args=timeout, poolclass=sqlalchemy.NullPool)


def _check_database(url: str, option: str) -> None:
    """A database server that accepts a connection within the timeout."""
    shown = mask(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect().import_dbapi()
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:  # before ArgumentError
        raise ConfigError(
            f"{option} is {shown!r}, but its database driver is missing ({error_reason(err)}); "
            "for PostgreSQL: pip install 'mate-orchestrator[postgres]'"
        ) from None
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"{option} is {shown!r}, which is not a database URL") from None
    if not parsed.host:
        raise ConfigError(f"{option} is {shown!r}, but names no database host")
    engine = _engine(url)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise ConfigError(f"cannot connect to {option} {shown}: {error_reason(err)}") from None
    finally:
        engine.dispose()


def _check_mlflow_server(url: str, option: str) -> None:
    """An MLflow tracking server answers ``GET /version``."""
    if not urlsplit(url).hostname:
        raise ConfigError(f"{option} is {mask(url)!r}, but names no host")
    import requests  # noqa: PLC0415  (lazy: a sweep on files, and `status`, need no HTTP client)

    try:
        reply = requests.get(f"{url.rstrip('/')}/version", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as err:
        reason = error_reason(err)
        raise ConfigError(
            f"cannot reach the MLflow tracking server at {mask(url)} ({option}): {reason}"
        ) from None
    if reply.status_code != 200:
        raise ConfigError(
            f"{option} is {mask(url)!r}, but it answers GET /version with HTTP "
            f"{reply.status_code}: not an MLflow tracking server"
        )


def _check_store(url: str, option: str, engines: tuple[str, ...], servers: bool) -> None:
    scheme = _scheme(url)
    if servers and scheme in _HTTP:
        _check_mlflow_server(url, option)
    elif scheme == "sqlite":
        _check_sqlite(url, option)
    elif scheme in engines:
        _check_database(url, option)
    else:
        kinds = ", ".join(f"{e}://" for e in engines if e != "sqlite")
        server = " or an MLflow server (http(s)://HOST:PORT)" if servers else ""
        raise ConfigError(
            f"{option} is {mask(url)!r}, but must be sqlite:///PATH, a database URL "
            f"({kinds}){server}"
        )


def check_tracking_uri(uri: str, option: str = "--tracking-uri") -> None:
    """A SQLite file, a database MLflow supports, or a reachable MLflow server."""
    _check_store(uri, option, _TRACKING_ENGINES, servers=True)


def check_study_storage(url: str, option: str = "--study-storage") -> None:
    """A SQLite file or a reachable PostgreSQL/MySQL database (Optuna's RDB storage)."""
    _check_store(url, option, _STUDY_ENGINES, servers=False)


def check_stores(record: SweepRecord) -> None:
    """The recorded sweep's tracking store and study storage answer (see
    :func:`check_study_of`)."""
    check_existing_store(record.tracking_uri, "the sweep's tracking URI", check_tracking_uri)
    check_study_of(record)


def check_study_of(record: SweepRecord) -> None:
    """The recorded sweep's study storage answers; a SQLite one must exist (opening a
    missing one would create an empty database)."""
    check_existing_store(record.study_storage, "the sweep's study storage", check_study_storage)


def check_existing_store(url: str, option: str, check: Callable[[str, str], None]) -> None:
    """`check` the store at `url`, which, where it is a SQLite file, must exist: a reader
    opening a missing one would create an empty database."""
    if _scheme(url) == "sqlite" and not sqlite_file(url).exists():
        raise ConfigError(f"{option} is {url!r}, but {sqlite_file(url)} does not exist")
    check(url, option)


def _database_has(url: str, table: str, column: str, value: str) -> bool:
    """Whether the database at `url` has a row with `column` = `value` in `table`
    (read only; False when the database or the table does not exist)."""
    query = f"SELECT 1 FROM {table} WHERE {column} = :value"
    if _scheme(url) == "sqlite":
        path = sqlite_file(url)
        if not path.is_file():
            return False
        with contextlib.closing(_read_only(path)) as db:
            exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            if db.execute(exists, (table,)).fetchone() is None:
                return False
            return db.execute(query, {"value": value}).fetchone() is not None
    engine = _engine(url)
    try:
        if not sqlalchemy.inspect(engine).has_table(table):
            return False
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(query), {"value": value}).first() is not None
    finally:
        engine.dispose()


def check_new_sweep(tracking_uri: str, study_storage: str, name: str) -> None:
    """Neither store holds a sweep of this name already: a new sweep would write into it."""
    if _scheme(tracking_uri) in _HTTP:
        # MLflow only for a tracking server: `status` and `report` use this module too,
        # and importing MLflow would double their start-up time.
        from mlflow.exceptions import MlflowException  # noqa: PLC0415
        from mlflow.tracking import MlflowClient  # noqa: PLC0415

        try:
            taken = MlflowClient(tracking_uri).get_experiment_by_name(name) is not None
        except MlflowException as err:
            raise ConfigError(
                f"the tracking server {mask(tracking_uri)} refused a query: {error_reason(err)}"
            ) from None
    else:
        taken = _database_has(tracking_uri, "experiments", "name", name)
    if taken:
        raise ConfigError(
            f"the tracking store {mask(tracking_uri)} already has an experiment named "
            f"{name!r}; choose another --name"
        )
    if _database_has(study_storage, "studies", "study_name", name):
        raise ConfigError(
            f"the study storage {mask(study_storage)} already has a study named {name!r}; "
            "choose another --name"
        )


def check_port_free(host: str, port: int) -> None:
    """`host`:`port` can be listened on now, as a web server binds it (SO_REUSEADDR): else
    one line, instead of a server that prints its address and then fails to bind."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host is {host!r}: {err.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(
                f"--port is {port}, but {host}:{port} cannot be listened on "
                f"({error_reason(err)}); choose another with --port"
            ) from None
