"""The node's one settings object, read from a TOML file and ``IDAICS_*`` environment variables.

``load_settings()`` reads ``config/node.toml`` (or the file named by ``IDAICS_CONFIG``);
any value can be overridden by an environment variable, nested keys joined by ``__``, for
example ``IDAICS_RECEIVER__PORT=11113`` or ``IDAICS_DATABASE_URL=postgresql+psycopg://...``.
The settings are passed to every part of the node; nothing reads them from a global.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.outputs.settings import DEFAULT_OBJECTS, OutputSettings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "node.toml"
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _ae(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters, no backslash)")
    return value.strip()


class TLS(BaseModel):
    """TLS for an outgoing association: the CA to trust and, optionally, our own certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True


class Destination(BaseModel):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLS | None = None

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae(v)

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class Receiver(BaseModel):
    ae_title: str = "IDAICS"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    #: Calling AE titles allowed to associate; empty allows any (the node logs a warning).
    allowed_calling_aets: list[str] = []
    #: Refuse an association whose called AE title is not `ae_title` (off: some routers send
    #: to one port under several titles).
    check_called_aet: bool = False
    max_associations: int = Field(default=10, ge=1)
    #: Below this much free space in the spool, C-STORE answers Out of Resources (0xA700).
    min_free_mb: int = Field(default=1024, ge=0)
    network_timeout_s: float = 60.0
    #: A connection that sends no A-ASSOCIATE-RQ within this long is closed.
    request_timeout_s: float = Field(default=5.0, gt=0)
    #: Connections one peer address may hold at once (further ones are closed at once).
    max_connections_per_peer: int = Field(default=8, ge=1)
    #: The largest PDU the node accepts (and announces); a longer one aborts the association.
    max_pdu_bytes: int = Field(default=1 << 20, ge=16384)
    #: The largest instance (its dataset, as sent) the node accepts; a larger one aborts the
    #: association while it comes in. Each association being received can hold about three
    #: times this in memory.
    max_instance_mb: int = Field(default=1024, ge=1)
    #: A message (a command, or an instance's dataset) that has been coming in for longer
    #: than the network timeout at less than this rate aborts its association: a peer that
    #: sends a small PDU just inside each network timeout would otherwise hold its slot for
    #: as long as it likes. 0 turns the check off.
    min_transfer_kib_s: float = Field(default=16.0, ge=0)
    #: A command that begins this long after the association's last instance (or its start)
    #: aborts the association: a peer that sends a C-ECHO just inside each network timeout
    #: would otherwise hold its slot for good. 0 turns the check off.
    max_idle_s: float = Field(default=600.0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        return [_ae(x) for x in v]


class SeriesRules(BaseModel):
    """When a series is complete, and which series are for this node."""

    quiet_seconds: float = Field(default=5.0, gt=0)
    #: A whole-looking series completes early only after this long without a new instance.
    grace_seconds: float = Field(default=1.0, ge=0)
    min_instances: int = Field(default=20, ge=2)
    max_slice_thickness_mm: float = 5.0
    #: BodyPartExamined values accepted (upper case); empty accepts any, a missing value too.
    body_parts: list[str] = []
    #: Series whose description matches one of these (regular expressions, case-insensitive)
    #: are skipped.
    skip_descriptions: list[str] = []


class Workers(BaseModel):
    count: int = Field(default=1, ge=0)
    device: str | None = None  # "cpu", "0", ...; default: the GPU when there is one
    poll_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    #: A running job whose worker has not been heard of for this long is queued again.
    stale_after_seconds: float = 60.0
    max_attempts: int = Field(default=3, ge=1)


class Sending(BaseModel):
    calling_ae_title: str = "IDAICS"
    max_attempts: int = Field(default=6, ge=1)
    backoff_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    timeout_s: float = 30.0
    #: The sender's threads, and how many of them one destination may hold at once.
    threads: int = Field(default=4, ge=1)
    per_destination: int = Field(default=2, ge=1)
    #: How often the sender looks for due deliveries (it is also told when results are queued).
    poll_seconds: float = Field(default=0.25, gt=0)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed tries: doubling, capped."""
        return min(self.backoff_max_seconds, self.backoff_seconds * 2 ** max(0, attempts - 1))


class Retention(BaseModel):
    #: Spooled instances of a job are removed this long after it is DONE (0 keeps them).
    delete_instances_after_hours: float = 24.0


class Corrections(BaseModel):
    """Radiologists' corrected SEGs, sent back to the node, kept as labelled cases."""

    enabled: bool = True
    #: Where labelled cases are kept (relative: under ``home``).
    cases_dir: Path = Path("cases")
    #: Segment label -> class (normal, schmorl, bulge, protrusion, or ignore), for labels
    #: other than the node's own; YAML or JSON.
    mapping: Path | None = None


class Web(BaseModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token: str | None = None
    username: str | None = None
    password: str | None = None
    show_patient_identity: bool = False


class Outputs(BaseModel):
    objects: list[str] = list(DEFAULT_OBJECTS)
    seg_series_number: int = 9801
    sr_series_number: int = 9802
    key_images_series_number: int = 9803
    volumetric_sr_series_number: int = 9804
    institution_name: str | None = None

    def settings(self, device_serial_number: str) -> OutputSettings:
        return OutputSettings(
            objects=tuple(self.objects),
            seg_series_number=self.seg_series_number,
            sr_series_number=self.sr_series_number,
            key_images_series_number=self.key_images_series_number,
            volumetric_sr_series_number=self.volumetric_sr_series_number,
            institution_name=self.institution_name,
            device_serial_number=device_serial_number,
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IDAICS_", env_nested_delimiter="__", extra="forbid"
    )

    #: Where the node keeps its state; relative paths below are resolved against it.
    home: Path = Path("var")
    spool_dir: Path = Path("spool")
    database_url: str = "sqlite:///idaics.db"
    #: The bundled model: the live one until a model of the registry is promoted.
    model: Path = ROOT / "models" / "idaics-v2"
    #: The model registry (`node.registry`): candidates, the live one, their figures.
    models_dir: Path = Path("models")
    receiver: Receiver = Receiver()
    series: SeriesRules = SeriesRules()
    workers: Workers = Workers()
    sending: Sending = Sending()
    retention: Retention = Retention()
    corrections: Corrections = Corrections()
    web: Web = Web()
    outputs: Outputs = Outputs()
    destinations: list[Destination] = []
    #: Calling AE title -> destination names; results of other callers go to `default_destinations`.
    routes: dict[str, list[str]] = {}
    default_destinations: list[str] = []

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.home = self.home.resolve()
        if not self.spool_dir.is_absolute():
            self.spool_dir = self.home / self.spool_dir
        if not self.models_dir.is_absolute():
            self.models_dir = self.home / self.models_dir
        if not self.corrections.cases_dir.is_absolute():
            self.corrections.cases_dir = self.home / self.corrections.cases_dir
        if self.database_url.startswith("sqlite:///") and not self.database_url.startswith(
            "sqlite:////"
        ):
            rel = self.database_url[len("sqlite:///") :]
            if rel and rel != ":memory:":
                self.database_url = f"sqlite:///{self.home / rel}"
        if not self.model.is_absolute():
            self.model = (ROOT / self.model).resolve()
        names = {d.name for d in self.destinations}
        wanted = set(self.default_destinations) | {n for v in self.routes.values() for n in v}
        if wanted - names:
            raise ValueError(
                f"unknown destination(s) {', '.join(sorted(wanted - names))}; "
                f"configured: {', '.join(sorted(names)) or 'none'}"
            )
        OutputSettings(objects=tuple(self.outputs.objects))  # checks the names
        return self

    def destinations_for(self, calling_aet: str) -> list[Destination]:
        names = self.routes.get(calling_aet.strip(), self.default_destinations)
        by_name = {d.name: d for d in self.destinations}
        return [by_name[n] for n in names]


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``path`` (or ``IDAICS_CONFIG``, or ``config/node.toml``), the environment
    and ``overrides``, in increasing priority."""
    path = Path(path or os.environ.get("IDAICS_CONFIG") or DEFAULT_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} not found")
    cls = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}}
    )
    return cls(**overrides)
