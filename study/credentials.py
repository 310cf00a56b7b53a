"""Credentials never reach a record: a password given in a URI moves to the environment.

A study records its tracking URI and Optuna storage in many places (``study.yaml``,
the Tune state, the parent run's params and ``spec/study.yaml``, the report's spec
block, console lines). A URI that carries a password is therefore split the moment
it enters a spec or a command (:func:`take_credentials`): the password (and for
HTTP the user name too) goes into this process's environment, in the variable the
client library reads, and the URI kept everywhere is the one without it:

==============================  ===============================================
URI                             where the credentials go
==============================  ===============================================
``http(s)://user:pw@host``      ``MLFLOW_TRACKING_USERNAME`` /
                                ``MLFLOW_TRACKING_PASSWORD`` (MLflow's basic auth)
``postgresql://user:pw@host``   ``PGPASSWORD`` (libpq, so psycopg2 under MLflow's
                                SQLAlchemy store and Optuna's RDBStorage); the
                                user name stays in the URI
``mysql://user:pw@host``        ``MYSQL_PWD`` (read by libmysqlclient, i.e. the
                                ``mysqlclient`` driver; PyMySQL ignores it)
``s3://key:secret@bucket``      ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
==============================  ===============================================

A password given as a query parameter (``postgresql://user@host/db?password=pw``, which
libpq and SQLAlchemy accept) moves the same way and the parameter is dropped from the URI.

``study resume`` reads the password-less URI back from ``study.yaml``; the
credentials come from the environment again (those variables, ``~/.pgpass``, an
AWS profile). A password in a URI of any other scheme is refused (ConfigError), as
are two URIs of one command whose passwords would go to the same variable with
different values (:func:`check_one_password`). :func:`redact` hides what remains in
free text (console lines, error messages, the command line).

Ray workers on other machines do not inherit this process's environment:
:func:`taken_env` gives the variables a URI of this command filled, for a task that
needs them there (``study doctor``'s node checks).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from trainables.errors import ConfigError

#: scheme prefix -> (variable of the user name or None: it stays in the URI, variable
#: of the password); a scheme matches its prefix (``postgresql+psycopg2`` too)
ENV_BY_SCHEME: dict[str, tuple[str | None, str]] = {
    "http": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "https": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "postgresql": (None, "PGPASSWORD"),
    "postgres": (None, "PGPASSWORD"),
    "mysql": (None, "MYSQL_PWD"),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
}

#: ``scheme://user:password@`` in free text
#: (the password runs to the host part's last ``@``: an unencoded ``@`` in it is hidden too)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#]*:)[^\s/]+@")
#: ``password=…`` as a query parameter (``?``/``&``/``;`` before it; ``sslpassword`` too)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;](?:ssl)?password=)[^&;#\s]+", re.IGNORECASE)
#: the query parameter that carries a password (libpq's keyword; matched case-blind)
PASSWORD_PARAMETER = "password"
#: the options whose URIs :func:`check_one_password` compares, in the order it is given
#: them (``SearchSpec`` passes the tracking URI, then the Optuna storage)
OPTION_LABELS = ("--tracking-uri", "--optuna-storage", "--storage")
#: the variables :func:`take_credentials` filled in this process (names only)
_TAKEN: set[str] = set()


def _variables(scheme: str) -> tuple[str | None, str] | None:
    base = scheme.lower().split("+", 1)[0]
    return ENV_BY_SCHEME.get(base)


def _query_password(query: str) -> tuple[str, list[str]]:
    """``query`` without its ``password`` parameters (the others kept as written), and
    their decoded values (SQLAlchemy's reading: ``+`` is a space)."""
    kept, found = [], []
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        if unquote_plus(key).lower() == PASSWORD_PARAMETER:
            found.append(unquote_plus(value))
        else:
            kept.append(item)
    return "&".join(kept), found


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``uri`` without its password, and the environment variables that carry it.

    The password is the one of the URI's user part (``user:password@``) or of a
    ``password`` query parameter. Changes nothing; a URI without a password comes back
    as it is, with ``{}``.

    Args:
        uri: a tracking URI, database URL or storage URI.

    Raises:
        ConfigError: a password in a URI whose scheme has no variable for it, or two
            different passwords in one URI.
    """
    if "://" not in uri:
        return uri, {}
    parts = urlsplit(uri)
    query, in_query = _query_password(parts.query)
    if parts.password is None and not in_query:
        return uri, {}
    names = _variables(parts.scheme)
    shown = redact(uri)
    if names is None:
        raise ConfigError(
            f"{shown}: a password in a {parts.scheme}:// URI would be recorded with the study; "
            "give the URI without it and the credentials the way its client reads them "
            "(environment, a password file)"
        )
    given = {unquote(parts.password)} if parts.password is not None else set()
    given.update(in_query)
    if len(given) > 1:
        raise ConfigError(
            f"{shown} carries two different passwords (in its user part and as "
            f"'{PASSWORD_PARAMETER}=' in its query); give the URI without any and the "
            "password the way its client reads it (environment, a password file)"
        )
    user_var, password_var = names
    netloc = parts.netloc.rpartition("@")[2]  # host[:port], as written
    env = {password_var: given.pop()}
    if parts.username and user_var is None:
        netloc = f"{parts.username}@{netloc}"
    elif parts.username and user_var is not None:
        env[user_var] = unquote(parts.username)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)), env


def take_credentials(uri: str | None) -> str | None:
    """``uri`` without its password, the password (and user) set in ``os.environ``.

    The URI's credentials replace a value the variable had: the user gave them
    for this command. None and URIs without a password come back unchanged.

    Args:
        uri: a tracking URI, database URL, storage URI, or None.
    """
    if not uri:
        return uri
    clean, env = split_credentials(uri)
    os.environ.update(env)
    _TAKEN.update(env)
    return clean


def taken_env(uris: Sequence[str | None] = ()) -> dict[str, str]:
    """The variables that a URI given to this process filled (:func:`take_credentials`),
    with their current values: what a Ray task on another machine, which does not inherit
    this process's environment, needs to act as this command does. Only the variables
    of the schemes of ``uris`` when some are given (the tracking URI and the storage,
    say); variables the user set themselves are not included (every node has its own).

    Args:
        uris: URIs (without passwords) whose clients the task runs; empty: every
            variable taken.
    """
    wanted = set(_TAKEN)
    if uris:
        wanted &= {
            name
            for uri in uris
            if uri and "://" in uri
            for name in (_variables(urlsplit(uri).scheme) or ())
            if name
        }
    return {name: os.environ[name] for name in sorted(wanted) if name in os.environ}


@contextlib.contextmanager
def applied(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the ``with`` block, then restore every variable
    it touched (removed again when it was not set). For one task of a process that runs
    one task at a time (a Ray worker, a check on the driver).

    Args:
        env: variable names and values (credentials: never printed).
    """
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_one_password(*uris: str | None, labels: Sequence[str] = OPTION_LABELS) -> None:
    """Refuse URIs whose passwords would go to the same variable with different values
    (``--tracking-uri`` and ``--optuna-storage`` on two PostgreSQL servers, say): libpq
    reads one ``PGPASSWORD``. The same password twice is fine.

    Call it with the URIs as given, before :func:`take_credentials` moves any of them
    (the CLI and :class:`study.spec.SearchSpec` both do), so that both paths refuse
    the same pairs with the same message.

    Args:
        uris: the URIs as given (None: an option not given).
        labels: the option each URI came from, by position (default: ``--tracking-uri``,
            ``--optuna-storage``, ``--storage``).

    Raises:
        ConfigError: one paragraph naming both options and what to do instead.
    """
    seen: dict[str, tuple[str, str, str]] = {}  # variable -> (value, label, URI shown)
    for at, uri in enumerate(uris):
        if not uri:
            continue
        label = labels[at] if at < len(labels) else f"URI {at + 1}"
        for var, value in split_credentials(uri)[1].items():
            if var in seen and seen[var][0] != value:
                _, first, shown = seen[var]
                where = _PASSWORD_FILES.get(var, "the file or variables its client reads")
                raise ConfigError(
                    f"{first} and {label} carry different credentials for {var}, which holds "
                    f"one value for both clients ({first} {shown}, {label} {redact(uri)}): "
                    f"give both URIs without passwords and the passwords in {where}, or use "
                    "the same user and password for both"
                )
            seen[var] = (value, label, redact(uri))


#: where two passwords for one variable can live instead (check_one_password's advice)
_PASSWORD_FILES = {
    "PGPASSWORD": "~/.pgpass (one line host:port:database:user:password per server, mode 600)",
    "MYSQL_PWD": "an option file (~/.my.cnf, one [client] section per server)",
}


def redact(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` shown as ``scheme://user:***@`` and
    every ``?password=…`` (or ``&password=…``) query parameter as ``?password=***``."""
    return _QUERY_PASSWORD.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>***@", text))
