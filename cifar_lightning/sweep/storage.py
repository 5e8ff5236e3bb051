"""Where a study lives: an SQLAlchemy URL (SQLite by default, PostgreSQL for many machines) or
Optuna's journal file (``journal:PATH``, for a shared file system)."""

from __future__ import annotations

import warnings

import optuna

from cifar_lightning.errors import UserError

#: The variable a trial's process reads its study's storage URL from (never its command line,
#: which every user of the machine can read, password included).
STORAGE_ENV = "CIFAR_SWEEP_STORAGE"


def make_storage(url: str, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """The study's storage: an SQLAlchemy URL (``sqlite:///``, ``postgresql://``) with a heartbeat,
    so a trial whose worker died is failed and retried once; or ``journal:PATH``, Optuna's journal
    file for a shared file system (no heartbeat there)."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(url[len("journal:") :]))
        except OSError as err:
            raise UserError(f"cannot open the study's journal file {url[len('journal:') :]}: {err}") from None
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy's default PostgreSQL driver differs between its releases; the lock has psycopg 3.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        with warnings.catch_warnings():  # the heartbeat's arguments are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                heartbeat_interval=heartbeat,
                grace_period=3 * heartbeat if heartbeat else None,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                if heartbeat
                else None,
            )
    except Exception as err:  # a bad URL, a server that does not answer, a missing driver
        raise UserError(f"cannot open the study's storage {safe_url(url)}: {type(err).__name__}: {err}") from None


def safe_url(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
