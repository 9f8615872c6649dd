"""The node's one configuration: a TOML or YAML file plus ``ICHNODE_*`` environment overrides.

Defaults give the embedded mode: SQLite index and spool under ``./var``, a broker transport that
needs no server, and a worker process started by ``ichnode serve``.

Environment overrides use ``ICHNODE_`` and ``__`` between levels, e.g.
``ICHNODE_DICOM__PORT=11113`` or ``ICHNODE_QUEUE__BROKER_URL=redis://127.0.0.1:6379/0``.
Each section class below belongs to one part of the system; keep a section's fields next to
the code that reads them in spirit, and document every field (the README's configuration
reference is generated from these descriptions by ``ichnode config reference``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "ICHNODE_CONFIG"
AE_TITLE_MAX = 16


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > AE_TITLE_MAX or "\\" in value or not value.isprintable():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value


class DicomSection(Section):
    """The DICOM service (SCP) that scanners and PACS send to."""

    ae_title: str = Field("ICHNODE", description="Our AE title (called AE that senders must use)")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the Storage/Verification SCP")
    allowed_calling_aes: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty list = any AE title",
    )
    allowed_addresses: list[str] = Field(
        default_factory=list,
        description="Peer IP addresses or CIDR networks allowed to connect; empty = any address",
    )
    require_called_ae: bool = Field(True, description="Reject associations whose called AE is not ours")
    max_associations: int = Field(10, ge=1, le=500, description="Concurrent associations accepted")
    max_pdu: int = Field(131072, ge=0, description="Maximum PDU size we receive (bytes, 0 = unlimited)")
    acse_timeout: float = Field(30.0, gt=0, description="ACSE timeout (s)")
    dimse_timeout: float = Field(60.0, gt=0, description="DIMSE timeout (s)")
    network_timeout: float = Field(60.0, gt=0, description="Network (idle) timeout (s)")
    tls_cert: Path | None = Field(None, description="PEM certificate: enables DICOM TLS on the SCP")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    tls_ca: Path | None = Field(None, description="CA bundle to verify peer certificates (mutual TLS)")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_allowed(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class StorageSection(Section):
    """Where received instances and work items live, and the index database."""

    root: Path = Field(Path("var"), description="Base folder for spool, work items and logs")
    index_url: str = Field(
        "", description="SQLAlchemy URL of the index; empty = sqlite file <root>/index.sqlite3"
    )
    min_free_mb: int = Field(
        500, ge=0, description="Refuse new instances (0xA700) when the spool disk has less free space"
    )
    fsync: bool = Field(True, description="fsync each received instance before acknowledging it")

    @property
    def spool_dir(self) -> Path:
        return self.root / "spool"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def resolved_index_url(self) -> str:
        return self.index_url or f"sqlite:///{(self.root / 'index.sqlite3').resolve()}"


class AssemblySection(Section):
    """When a study counts as complete, and which series is analysed."""

    quiet_period_s: float = Field(
        60.0, gt=0, description="Study complete after this long without a new instance"
    )
    min_slices: int = Field(16, ge=1, description="Fewest axial slices a usable head series has")
    max_slice_thickness_mm: float = Field(5.0, gt=0, description="Thickest usable reconstruction")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the assembler looks at studies")


class QueueSection(Section):
    """Celery broker and worker settings."""

    broker_url: str = Field(
        "",
        description="Celery broker URL; empty = embedded filesystem transport under <root>/broker",
    )
    result_backend: str = Field("", description="Celery result backend; empty = none needed")
    embedded_worker: bool = Field(
        True, description="`ichnode serve` starts and supervises a local worker for all queues"
    )
    worker_concurrency: int = Field(1, ge=1, le=64, description="Processes of the embedded worker")
    max_attempts: int = Field(3, ge=1, le=20, description="Attempts of a job before it is failed")
    retry_backoff_s: float = Field(5.0, ge=0, description="First retry delay; doubles each attempt")
    task_timeout_s: float = Field(900.0, gt=0, description="Hard time limit of one task")
    lost_worker_grace_s: float = Field(
        60.0, ge=5, le=3600,
        description="Margin past the task limit and the longest retry countdown before a RUNNING "
        "job without row updates is taken as lost with its worker and re-published",
    )
    steps: list[str] = Field(
        default_factory=lambda: ["prepare", "deid", "analyze", "report"],
        description="Pipeline steps run one after the other (modules in workers/steps)",
    )
    side_steps: list[str] = Field(
        default_factory=lambda: ["ner"],
        description="Steps run beside the chain; the last step waits for them (empty = none)",
    )
    queue_prefix: str = Field(
        "", description="Prefix of the Celery queue names (several nodes on one Redis)"
    )
    dispatch_interval_s: float = Field(
        1.0, gt=0, description="How often the dispatcher hands new jobs to the broker"
    )
    requeue_after_s: float = Field(
        300.0, ge=0,
        description="Re-publish a QUEUED job whose message is in no Redis queue and held by no "
        "worker after this long without progress (0 = never; not checked with the embedded "
        "filesystem transport)",
    )
    requeue_max: int = Field(
        3, ge=1, le=20,
        description="Re-publishes of one job (lost message or lost worker) before it is failed",
    )

    # Derived time limits, kept here so their order is visible in one place:
    # a step's silence < running_lost_after_s < broker_visibility_timeout_s.
    @property
    def longest_retry_delay_s(self) -> float:
        """Longest countdown before a step's last retry (the job row is silent meanwhile)."""
        return self.retry_backoff_s * 2 ** max(0, self.max_attempts - 2)

    @property
    def running_lost_after_s(self) -> float:
        """A RUNNING job without any row update for this long lost its worker (host died):
        a live worker updates the row at least at every start, retry note and finish."""
        return self.task_timeout_s + self.longest_retry_delay_s + self.lost_worker_grace_s

    @property
    def broker_visibility_timeout_s(self) -> int:
        """Redis redelivers an unacknowledged message after this long. Longer than a worker
        can legitimately hold one (run + retry countdowns) — a redelivery keeps the token, so
        an early one could run a step twice — and longer than running_lost_after_s, so the
        node's re-dispatch with a new token comes first and the late copy is dropped."""
        return int(self.task_timeout_s + self.retry_backoff_s * 2 ** self.max_attempts
                   + self.lost_worker_grace_s + 240)


class Destination(Section):
    """A DICOM peer we send to (C-STORE)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    storage_commitment: bool = Field(False, description="Confirm deliveries with Storage Commitment")
    tls: bool = Field(False, description="Use DICOM TLS to this peer")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class SendSection(Section):
    """The SCU that delivers to destinations (outbox)."""

    calling_ae: str = Field("ICHNODE", description="AE title we use when sending")
    max_attempts: int = Field(8, ge=1, le=100, description="Attempts before a send is failed")
    retry_backoff_s: float = Field(5.0, ge=0, description="First retry delay; doubles each attempt")
    max_backoff_s: float = Field(600.0, ge=0, description="Longest delay between attempts")
    max_pdu: int = Field(131072, ge=0, description="Maximum PDU size when sending")
    commit_timeout_s: float = Field(
        600.0, gt=0, description="Storage Commitment: re-send what stays unconfirmed this long")
    commit_wait_s: float = Field(
        2.0, ge=0, description="Storage Commitment: keep the association open this long for a "
        "report on it")

    _ae = field_validator("calling_ae")(classmethod(lambda cls, v: _check_ae_title(v)))


class ModelsSection(Section):
    """Which weights the gpu/ner workers load (folders with a model card and checksum)."""

    triage: Path | None = Field(None, description="Triage model folder; empty = bundled demo weights")
    segment: Path | None = Field(None, description="Segmentation model folder; empty = bundled demo")
    ner: Path | None = Field(None, description="NER model folder; empty = bundled demo weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Inference device")


class DeidSection(Section):
    """De-identification and defacing in the PHI zone."""

    deface_mode: Literal["ichnode", "mosmed", "off"] = Field(
        "ichnode", description="Defacing method for work items and de-identified copies"
    )
    date_shift_days: int | None = Field(
        None, description="Fixed date shift; empty = per-patient shift derived from the secret"
    )
    secret: SecretStr = Field(
        SecretStr(""), description="Key for pseudonyms/UID remapping; empty = generated and stored"
    )


class RoutingSection(Section):
    """Routing rules, worklist priority and notifications."""

    rules_file: Path | None = Field(None, description="YAML routing rules; empty = no rules")
    results_to: list[str] = Field(
        default_factory=list, description="Destinations that always receive SEG/SR/overlay"
    )
    hl7_host: str | None = Field(None, description="RIS MLLP host for priority messages")
    hl7_port: int | None = Field(None, ge=1, le=65535, description="RIS MLLP port")
    webhook_url: str | None = Field(None, description="URL that receives priority JSON (POST)")
    webhook_secret: SecretStr = Field(SecretStr(""), description="HMAC key for webhook signatures")
    stat_volume_ml: float = Field(30.0, ge=0, description="Hematoma volume that makes a study STAT")
    stat_shift_mm: float = Field(5.0, ge=0, description="Midline shift that makes a study STAT")
    urgent_on_any_ich: bool = Field(True, description="Any hemorrhage present makes a study at least URGENT")
    stat_on_ivh: bool = Field(True, description="Intraventricular hemorrhage makes a study STAT")
    stat_on_anticoagulation: bool = Field(
        True, description="Hemorrhage in an anticoagulated patient (NER flag) makes a study STAT")
    not_analysed_priority: Literal["STAT", "URGENT", "ROUTINE"] = Field(
        "ROUTINE", description="Priority of a study the node could not analyse")
    notify_levels: list[Literal["STAT", "URGENT", "ROUTINE"]] = Field(
        default_factory=lambda: ["STAT", "URGENT"],
        description="Priority levels pushed to the RIS (HL7) and the webhook")
    notify_attempts: int = Field(3, ge=1, le=20, description="Tries per notification channel")
    notify_backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each try")
    notify_timeout_s: float = Field(5.0, gt=0, description="Connect/response timeout per try")
    hl7_sending_facility: str = Field("ICHNODE", description="MSH-4 of the ORU^R01 messages we send")
    hl7_receiving_application: str = Field("RIS", description="MSH-5 of the ORU^R01 messages")


class Hl7InSection(Section):
    """HL7 v2 MLLP listener for clinical text (ORU/MDM with OBX/NTE text) feeding the NER step."""

    enabled: bool = Field(False, description="Start the MLLP listener with the node")
    host: str = Field("127.0.0.1", description="Address the MLLP listener binds to")
    port: int = Field(2575, ge=1, le=65535, description="TCP port of the MLLP listener")
    max_message_bytes: int = Field(
        1_048_576, ge=1024, description="Largest HL7 message accepted; larger ones are rejected (AR)"
    )
    read_timeout_s: float = Field(30.0, gt=0, description="Close a connection idle this long (s)")
    ner_on_arrival: bool = Field(
        True, description="Re-run NER for a study whose images arrived before the text"
    )


class Settings(BaseSettings):
    """Effective configuration: file values, then ICHNODE_* environment overrides on top."""

    model_config = SettingsConfigDict(
        env_prefix="ICHNODE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    dicom: DicomSection = Field(default_factory=DicomSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    assembly: AssemblySection = Field(default_factory=AssemblySection)
    queue: QueueSection = Field(default_factory=QueueSection)
    send: SendSection = Field(default_factory=SendSection)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    models: ModelsSection = Field(default_factory=ModelsSection)
    deid: DeidSection = Field(default_factory=DeidSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    hl7_in: Hl7InSection = Field(default_factory=Hl7InSection)
    log_level: str = Field("INFO", description="Log level")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (init kwargs carry the file's values).
        return (env_settings, init_settings)

    @property
    def broker_url(self) -> str:
        return self.queue.broker_url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.storage.root / "broker"


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML file into a dict (never evaluates anything)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping")
    return data


def _format_validation_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return f"{source}: " + "; ".join(parts)


def load_settings(path: Path | str | None = None) -> Settings:
    """Load the file named by ``path`` or $ICHNODE_CONFIG (if any), then environment overrides."""
    path = path or os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "environment/defaults"
    if path:
        path = Path(path)
        data = read_config_file(path)
        source = str(path)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from exc


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Effective configuration for display: secrets and URL passwords masked."""
    data = settings.model_dump(mode="json")
    data["queue"]["broker_url"] = mask_url(settings.broker_url)
    if settings.queue.result_backend:
        data["queue"]["result_backend"] = mask_url(settings.queue.result_backend)
    data["storage"]["index_url"] = mask_url(settings.storage.resolved_index_url)
    return data


def mask_url(url: str) -> str:
    """Hide the password in scheme://user:password@host URLs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:****@{host}" if ":" in creds else url


def reference_markdown() -> str:
    """The configuration reference (README): one table per section, from the field descriptions."""
    lines: list[str] = []
    for name, field in Settings.model_fields.items():
        model = field.annotation
        if name == "destinations":
            model, name = Destination, "destinations.<name>"
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            lines += [f"- `{name}` (default `{field.default}`): {field.description or ''}", ""]
            continue
        lines += [f"### `{name}`", "", (model.__doc__ or "").strip(), "",
                  "| key | default | meaning |", "|---|---|---|"]
        for key, sub in model.model_fields.items():
            default = "(required)" if sub.is_required() else sub.get_default(call_default_factory=True)
            if isinstance(default, SecretStr):
                default = ""
            lines.append(f"| `{key}` | `{default}` | {sub.description or ''} |")
        lines.append("")
    return "\n".join(lines)
