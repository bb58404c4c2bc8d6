"""A sweep's identity: :class:`SweepRecord` (``sweep.json``, what `resume`, `status` and
`promote` need to find a sweep again) and :class:`SweepTarget` (where its records go).

Store URLs are kept in ``sweep.json`` with their passwords masked
(:mod:`orchestrator.entities.credentials`). A sweep is read where its ``sweep.json`` is
found: moved (or mounted elsewhere), its directory and its default study file
(``optuna.db`` inside it) are taken from there, and ``moved_from`` names where it was
recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Self

from orchestrator.entities.credentials import mask, remember, reveal
from orchestrator.entities.env import STUDY_STORAGE, SWEEP_STORAGE, TRACKING_URI
from orchestrator.entities.errors import first_line
from orchestrator.entities.names import RECORD_FILE, SPACE_COPY, STUDY_FILE
from orchestrator.entities.space import SpaceSpec, load_space
from trainer.config import ConfigError

__all__ = ["DEFAULT_STORAGE", "SweepRecord", "SweepTarget", "sweep_name_for"]

DEFAULT_STORAGE = SWEEP_STORAGE.default
# Fields holding store URLs -> (CLI option, environment variable) that give them
_URL_OPTIONS = {
    "tracking_uri": ("--tracking-uri", TRACKING_URI.name),
    "study_storage": ("--study-storage", STUDY_STORAGE.name),
}


class _StoreUrls:
    """The masked and revealed forms of a frozen dataclass with a sweep's store URLs."""

    tracking_uri: str
    study_storage: str

    def masked(self) -> Self:
        """This value with its store URLs' passwords masked (for files and pickles)."""
        return replace(self, **{key: mask(getattr(self, key)) for key in _URL_OPTIONS})

    def revealed(self) -> Self:
        """This value with its store URLs' passwords back (see ``credentials.reveal``)."""
        return replace(self, **{key: reveal(getattr(self, key)) for key in _URL_OPTIONS})


@dataclass(frozen=True)
class SweepTarget(_StoreUrls):
    """Where one sweep's records go: its MLflow experiment and parent run, its Optuna study
    (named after the sweep) and its directory (where the MLflow writer's journal lives)."""

    name: str
    directory: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_storage: str


@dataclass(frozen=True)
class SweepRecord(_StoreUrls):
    """What `resume`, `status` and `promote` need to find a sweep again."""

    name: str
    storage_path: str  # Ray Tune storage root (absolute); the sweep lives in storage/name
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_storage: str  # Optuna RDB URL
    gpus: int
    address: str | None
    max_concurrent: int | None
    num_samples: int
    created: str
    # Where the sweep was recorded, when it is read elsewhere (not kept in sweep.json).
    moved_from: str | None = None

    @property
    def directory(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def space_file(self) -> Path:
        return self.directory / SPACE_COPY

    @property
    def target(self) -> SweepTarget:
        return SweepTarget(
            name=self.name,
            directory=str(self.directory),
            tracking_uri=self.tracking_uri,
            experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id,
            study_storage=self.study_storage,
        )

    def save(self) -> None:
        """Write sweep.json, with the store URLs' passwords masked."""
        stored = asdict(self.masked())
        del stored["moved_from"]
        (self.directory / RECORD_FILE).write_text(json.dumps(stored, indent=2) + "\n")

    @classmethod
    def load(
        cls,
        name: str,
        storage_path: str | Path = DEFAULT_STORAGE,
        full_urls: Iterable[str | None] = (),
    ) -> SweepRecord:
        """Read sweep.json, where it is now (see the module doc); masked store URLs are filled
        in from `full_urls` (the --tracking-uri/--study-storage the user gave), else
        ConfigError."""
        here = Path(storage_path).resolve()
        path = here / name / RECORD_FILE
        if not path.is_file():
            known = sorted(p.parent.name for p in Path(storage_path).glob(f"*/{RECORD_FILE}"))
            hint = f"; known sweeps: {', '.join(known)}" if known else ""
            raise ConfigError(f"no sweep named {name!r} under {storage_path}{hint}")
        try:
            stored = json.loads(path.read_text())
            cls(**stored)  # every field there, no unknown one
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{path} is damaged ({first_line(err)})") from None
        if stored["storage_path"] != str(here):
            stored = _found_in(stored, here)
        full_urls = list(full_urls)
        revealed = {}
        for key, (option, env) in _URL_OPTIONS.items():
            try:
                revealed[key] = reveal(stored[key], full_urls)
            except LookupError:
                raise ConfigError(
                    f"sweep {name!r} uses {stored[key]}: give its password with {option} or {env}"
                ) from None
            remember(revealed[key])  # for the callback and searcher Tune unpickles
        return cls(**{**stored, **revealed})

    def spec(self) -> SpaceSpec:
        return load_space(self.space_file)


def _found_in(stored: dict, here: Path) -> dict:
    """A sweep's stored record, read under `here` rather than where it was recorded: its
    directory, and its study when that is the default file inside it, are under `here`."""
    recorded = Path(stored["storage_path"])
    study = stored["study_storage"]
    if study == f"sqlite:///{recorded / stored['name'] / STUDY_FILE}":
        study = f"sqlite:///{here / stored['name'] / STUDY_FILE}"
    moved = {"storage_path": str(here), "study_storage": study, "moved_from": str(recorded)}
    return stored | moved


def sweep_name_for(space_file: str | Path) -> str:
    """``<space file stem>-<timestamp>``, with characters a sweep name cannot have as '-'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(space_file).stem).strip("-._")[:80]
    return f"{stem or 'sweep'}-{datetime.now():%Y%m%d-%H%M%S}"
