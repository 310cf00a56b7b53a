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

``study resume`` reads the password-less URI back from ``study.yaml``; the
credentials come from the environment again (those variables, ``~/.pgpass``, an
AWS profile). A password in a URI of any other scheme is refused (ConfigError).
:func:`redact` hides what remains in free text (console lines, error messages,
the command line).
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

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


def _variables(scheme: str) -> tuple[str | None, str] | None:
    base = scheme.lower().split("+", 1)[0]
    return ENV_BY_SCHEME.get(base)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``uri`` without its password, and the environment variables that carry it.

    Changes nothing; a URI without a password comes back as it is, with ``{}``.

    Args:
        uri: a tracking URI, database URL or storage URI.

    Raises:
        ConfigError: a password in a URI whose scheme has no variable for it.
    """
    if "://" not in uri:
        return uri, {}
    parts = urlsplit(uri)
    if parts.password is None:
        return uri, {}
    names = _variables(parts.scheme)
    shown = redact(uri)
    if names is None:
        raise ConfigError(
            f"{shown}: a password in a {parts.scheme}:// URI would be recorded with the study; "
            "give the URI without it and the credentials the way its client reads them "
            "(environment, a password file)"
        )
    user_var, password_var = names
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    env = {password_var: unquote(parts.password)}
    if user_var is None:
        netloc = f"{parts.username}@{host}" if parts.username else host
    else:
        netloc = host
        if parts.username:
            env[user_var] = unquote(parts.username)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), env


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
    return clean


def check_one_password(*uris: str | None) -> None:
    """Refuse two URIs whose passwords would go to the same variable with different values
    (``--tracking-uri`` and ``--optuna-storage`` on two PostgreSQL servers, say): libpq
    reads one ``PGPASSWORD``; ``~/.pgpass`` keeps one per host."""
    seen: dict[str, tuple[str, str]] = {}
    for uri in uris:
        if not uri:
            continue
        for var, value in split_credentials(uri)[1].items():
            if var in seen and seen[var][0] != value:
                raise ConfigError(
                    f"{redact(seen[var][1])} and {redact(uri)} carry different credentials "
                    f"for {var}, which holds one; give them in a password file (~/.pgpass "
                    "for PostgreSQL: one line per host) and the URIs without them"
                )
            seen[var] = (value, uri)


def redact(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` shown as ``scheme://user:***@``."""
    return _USERINFO.sub(r"\g<head>***@", text)
