import pickle

import pytest

from orchestrator.entities.credentials import (
    MaskedWhenPickled,
    has_secret,
    mask,
    remember,
    reveal,
)
from orchestrator.entities.sweep import SweepTarget


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        (
            "postgresql+psycopg://u:p@ss@h:5432/db?sslmode=require",
            "postgresql+psycopg://u:***@h:5432/db?sslmode=require",
        ),
        ("mysql://u:pw@[::1]:3306/db", "mysql://u:***@[::1]:3306/db"),
        ("postgresql://u@h/db?password=secret&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("https://u:tok@mlflow.example:443", "https://u:***@mlflow.example:443"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("notascheme://x", "notascheme://x"),
    ],
)
def test_mask_hides_passwords_and_nothing_else(url, masked):
    assert mask(url) == masked
    assert has_secret(url) == (url != masked)


def test_reveal_takes_the_full_url_that_matches_all_but_the_password():
    full = "postgresql://mate:hunter2@db.internal:5432/optuna"
    other = "postgresql://mate:hunter2@db.internal:5432/mlflow"
    assert reveal(mask(full), [None, other, full]) == full
    assert reveal("sqlite:////x.db") == "sqlite:////x.db"  # nothing masked: itself
    with pytest.raises(LookupError):
        reveal(mask("postgresql://a:b@elsewhere/db"), [other])


def test_reveal_finds_what_this_process_remembered():
    full = "postgresql://mate:s3cret@remembered/db"
    assert remember(full) == "postgresql://mate:***@remembered/db"
    assert reveal("postgresql://mate:***@remembered/db") == full


class _Connected(MaskedWhenPickled):
    _secret_fields = ("url", "target")
    _fresh_fields = (("client", lambda: None), ("cache", dict))

    def __init__(self, url: str, target: SweepTarget) -> None:
        self.url, self.target = url, target
        self.client, self.cache = object(), {"a": 1}


def test_objects_tune_pickles_keep_no_password_and_no_live_client():
    full = "postgresql://mate:pickled-secret@db/optuna"
    target = SweepTarget("s", "/sweeps/s", full.replace("optuna", "mlflow"), "1", "run", full)
    data = pickle.dumps(_Connected(full, target))
    assert b"pickled-secret" not in data
    restored = pickle.loads(data)
    assert restored.url == mask(full)
    assert restored.target == target.masked()
    assert (restored.client, restored.cache) == (None, {})
    remember(full)
    remember(target.tracking_uri)
    assert restored.target.revealed() == target
