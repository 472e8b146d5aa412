"""The one typed settings object of Precedent.

Values come, in rising priority, from the embedded defaults below, a TOML file
(`config/precedent.toml` documents every key), and environment variables named
``PRECEDENT_<SECTION>__<KEY>``. Key names are part of the product's interface:
sites keep their files across versions, so keys are added, never renamed.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key."""


def _check_ae_title(value: str) -> str:
    """AE titles are 1-16 characters of the default repertoire, no backslash (PS3.5 6.2)."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(value) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {value!r} has {len(value)}")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError(f"{value!r} holds a backslash or a character outside printable ASCII")
    return stripped


def _check_pdu_size(value: int) -> int:
    if value != 0 and not 4096 <= value <= 2**32 - 1:
        raise ValueError("max_pdu is 0 (no limit) or 4096 to 4294967295 bytes")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
# What a calling AE may ask of the node (dicom.permissions): C-STORE; C-FIND; C-MOVE and C-GET.
Service = Literal["store", "query", "retrieve"]
SERVICES: tuple[Service, ...] = ("store", "query", "retrieve")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallingAE(_Section):
    """One allowlist entry: an AE title, optionally tied to the host it must come from."""

    ae_title: AETitle
    host: str | None = None

    @classmethod
    def parse(cls, entry: str) -> CallingAE:
        """Read ``AET`` or ``AET@host`` (host: an IP address or a network in CIDR form)."""
        title, _, host = entry.partition("@")
        if host:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {host!r} is not an IP address or network") from exc
        return cls(ae_title=title, host=host or None)

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)


def _parse_calling_aes(entries: list[str]) -> list[str]:
    for entry in entries:
        CallingAE.parse(entry)
    return entries


class DicomSettings(_Section):
    ae_title: AETitle = "PRECEDENT"
    port: Port = 11112
    bind: str = "0.0.0.0"
    similar_ae_title: AETitle = "PRECEDENT_SIM"
    allowed_calling_aets: Annotated[list[str], AfterValidator(_parse_calling_aes)] = []
    max_associations: int = Field(16, ge=1, le=1000)
    max_pdu: Annotated[int, AfterValidator(_check_pdu_size)] = 131072
    max_instance_bytes: int = Field(2 * 1024**3, ge=1024)
    accept_private_sop_classes: bool = True
    acse_timeout: float = Field(10.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(120.0, gt=0)
    shutdown_timeout: float = Field(30.0, ge=0)
    permissions: dict[AETitle, list[Service]] = {}

    @model_validator(mode="after")
    def _distinct_titles(self) -> DicomSettings:
        if self.ae_title == self.similar_ae_title:
            raise ValueError("ae_title and similar_ae_title must differ")
        return self

    def calling_aes(self) -> list[CallingAE]:
        return [CallingAE.parse(entry) for entry in self.allowed_calling_aets]

    def services_of(self, calling_ae_title: str) -> frozenset[Service]:
        """What ``dicom.permissions`` lets this calling AE do: all services when it is not listed."""
        granted = self.permissions.get(calling_ae_title.strip())
        return frozenset(SERVICES if granted is None else granted)


class StorageSettings(_Section):
    data_dir: Path = Path("precedent-data")
    on_duplicate: Literal["keep", "replace"] = "keep"
    fsync: bool = True
    min_free_bytes: int = Field(512 * 1024**2, ge=0)


class CatalogSettings(_Section):
    url: str = ""


class QueueSettings(_Section):
    broker_url: str = ""
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = "precedent"
    serve_workers: int = Field(1, ge=0, le=64)
    worker_concurrency: int = Field(1, ge=1, le=64)
    poll_seconds: float = Field(0.2, gt=0, le=60)
    max_in_flight: int = Field(256, ge=1)
    republish_seconds: float = Field(300.0, gt=0)
    lease_seconds: float = Field(300.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=100)
    retry_backoff_seconds: float = Field(2.0, ge=0)


class StudySettings(_Section):
    stable_seconds: float = Field(60.0, ge=0)


class ModelSettings(_Section):
    bundle: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, le=256)
    batch_size: int = Field(8, ge=1, le=1024)
    batch_wait_seconds: float = Field(0.05, ge=0, le=10)
    frame_policy: Literal["middle", "each", "most_suspicious"] = "middle"
    max_frames: int = Field(32, ge=1, le=10000)
    gradcam: bool = True
    gradcam_label: str = ""


class ResultsSettings(_Section):
    """What the node makes of a stable study's analyses: an SR and Grad-CAM captures."""

    enabled: bool = True
    similar_studies: int = Field(5, ge=0, le=100)
    gradcam_opacity: float = Field(0.4, ge=0, le=1)


class SimilaritySettings(_Section):
    """Similar-case search: the FAISS index kept from the catalog's embeddings, and how
    similarity C-FIND requests to ``dicom.similar_ae_title`` are answered."""

    k: int = Field(10, ge=1, le=1000)
    max_k: int = Field(100, ge=1, le=10000)
    same_patient: bool = False
    metric: Literal["cosine", "l2"] = "cosine"
    index: Literal["auto", "flat", "ivfpq", "hnsw"] = "auto"
    flat_max_vectors: int = Field(10_000, ge=1)
    sync_seconds: float = Field(0.5, gt=0, le=60)
    snapshot: bool = True


class ForwardingSettings(_Section):
    """How results reach ``[[destinations]]``: a queue per destination, kept in the catalog."""

    poll_seconds: float = Field(1.0, gt=0, le=60)
    batch_size: int = Field(64, ge=1, le=10000)
    retry_backoff_seconds: float = Field(5.0, gt=0)
    max_backoff_seconds: float = Field(300.0, gt=0)
    lease_seconds: float = Field(300.0, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class MetricsSettings(_Section):
    """The node's HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` for probes."""

    port: int = Field(0, ge=0, le=65535)
    bind: str = "127.0.0.1"


class TlsSettings(_Section):
    """DICOM over TLS (PS3.15 B.1): the acceptor's, and the node's own associations to the
    ``[[destinations]]`` with ``tls = true``. The files are checked at start-up
    (:mod:`node.tls`); here only that the keys a TLS acceptor needs are set."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    minimum_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled:
            missing = [f"tls.{key}" for key in ("certificate", "private_key") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} must be set when tls.enabled is true")
            if self.require_client_certificate and self.ca_certificates is None:
                raise ValueError(
                    "tls.ca_certificates must be set when tls.require_client_certificate is true: "
                    "client certificates are checked against it"
                )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key go together: set both or neither")
        return self


class AuditSettings(_Section):
    """The audit trail: who asked the node for what, kept in the catalog (``precedent audit``)."""

    enabled: bool = True
    flush_seconds: float = Field(0.5, gt=0, le=60)
    max_queued: int = Field(100_000, ge=1)


class Destination(_Section):
    """A peer the node sends to: a C-MOVE destination and, with ``results``, where every
    SR and Grad-CAM capture is forwarded; with ``tls``, over TLS, its certificate checked
    against ``tls.ca_certificates`` and ``host``."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    ae_title: AETitle
    host: Annotated[str, Field(min_length=1)]
    port: Port
    results: bool = True
    tls: bool = False


class Settings(BaseSettings):
    """Everything a Precedent process may be told; built by :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="PRECEDENT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    catalog: CatalogSettings = CatalogSettings()
    queue: QueueSettings = QueueSettings()
    study: StudySettings = StudySettings()
    model: ModelSettings = ModelSettings()
    results: ResultsSettings = ResultsSettings()
    similarity: SimilaritySettings = SimilaritySettings()
    forwarding: ForwardingSettings = ForwardingSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()
    tls: TlsSettings = TlsSettings()
    metrics: MetricsSettings = MetricsSettings()
    destinations: list[Destination] = []

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, destinations: list[Destination]) -> list[Destination]:
        names = [d.name for d in destinations]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destination names must be unique: {', '.join(duplicated)}")
        return destinations

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment overrides the file, which arrives as init arguments."""
        return (env_settings, init_settings)

    def catalog_url(self) -> str:
        """The configured catalog URL, or a SQLite file inside the data directory."""
        if self.catalog.url:
            return self.catalog.url
        return f"sqlite:///{(self.storage.data_dir / 'catalog.sqlite3').resolve()}"


CONFIG_FILE_VARIABLE = "PRECEDENT_CONFIG"


def config_file_from_environment() -> Path | None:
    """The settings file named by ``PRECEDENT_CONFIG``, for processes started without a
    ``--config`` option (``celery -A workers.app worker``)."""
    named = os.environ.get(CONFIG_FILE_VARIABLE, "")
    return Path(named) if named else None


def load_settings(config_file: Path | None = None) -> Settings:
    """Build the settings from defaults, an optional TOML file and the environment.

    Raises :class:`ConfigError` with one line per problem, each naming its key.
    """
    values = _read_toml(config_file) if config_file is not None else {}
    try:
        return Settings(**values)
    except ValidationError as exc:
        origin = f" in {config_file}" if config_file is not None else ""
        lines = [f"configuration error{origin} (or PRECEDENT_* environment):"]
        lines += [f"  {_key_name(err['loc'])}: {_describe(err)}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def _read_toml(config_file: Path) -> dict[str, Any]:
    try:
        text = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {config_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {config_file} cannot be read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {config_file} is not valid TOML: {exc}") from None


def _key_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "(top level)"


def _describe(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return "missing value (required)"
    return f"{message} (got {err['input']!r})"
