import pytest

from orchestrator.entities.credentials import has_secret, mask, remember, reveal


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
