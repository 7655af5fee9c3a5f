"""Validated configuration: TOML in, typed objects out.

Every error names the key path and the bad value, the way a user would look it
up in their file::

    streams[0].features[2]: expected a field name, got 3

``load_config(path)`` is the one entry point; ``parse_config(dict)`` validates an
already-parsed document (tests and the demo build configs in memory).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from streamlearn.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_FIELD_RE = re.compile(r"^[^\x00-\x1f]{1,128}$")


def _field_name(value: Any) -> str:
    if not isinstance(value, str) or not _FIELD_RE.match(value):
        raise PydanticCustomError("field_name", "expected a field name")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise PydanticCustomError(
            "name",
            "expected a name of letters, digits, '_', '-' or '.' (at most 64, no '/', '+' or '#')",
        )
    return value


def _topic_filter(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PydanticCustomError("topic_filter", "expected an MQTT topic filter")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise PydanticCustomError(
                "topic_filter", "'#' must be a whole topic level and the last one"
            )
        if "+" in level and level != "+":
            raise PydanticCustomError("topic_filter", "'+' must be a whole topic level")
    if "\x00" in value:
        raise PydanticCustomError("topic_filter", "topic filters cannot contain NUL")
    return value


FieldName = Annotated[str, BeforeValidator(_field_name)]
Name = Annotated[str, BeforeValidator(_name)]
TopicFilter = Annotated[str, BeforeValidator(_topic_filter)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class TLSConfig(_Section):
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure: bool = False


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    keepalive: int = Field(30, ge=5, le=65535)
    session_expiry: int = Field(7 * 24 * 3600, ge=0)
    receive_maximum: int = Field(1000, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: TLSConfig | None = None
    reconnect_min_delay: int = Field(1, ge=1, le=300)
    reconnect_max_delay: int = Field(30, ge=1, le=3600)
    topic_prefix: Name = "streamlearn"
    max_queued_publishes: int = Field(10_000, ge=100)
    network_loop: Literal["thread", "agent"] = "agent"

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        if value in (5, 5.0):
            return "5"
        if value == 3.11 or value == "3":
            return "3.1.1"
        return value

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise PydanticCustomError("password", "give password or password_file, not both")
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise PydanticCustomError(
                "reconnect", "reconnect_max_delay must be at least reconnect_min_delay"
            )
        return self


class DeviceConfig(_Section):
    """Where the device id of a reading comes from (neither: one device, ``default``)."""

    topic_level: int | None = Field(None, ge=0, le=64)
    field: FieldName | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DeviceConfig:
        if self.topic_level is not None and self.field is not None:
            raise PydanticCustomError("device", "give topic_level or field, not both")
        return self


class LabelConfig(_Section):
    """Where the target of a reading comes from.

    ``payload``: a field of the same message. ``topic``: a later message on a label
    topic, joined by id. ``forecast``: the value of ``field`` ``horizon`` readings later
    on the same device (self-supervised).
    """

    source: Literal["payload", "topic", "forecast"] = "payload"
    field: FieldName
    topic: TopicFilter | None = None
    id_field: FieldName | None = None
    label_id_field: FieldName | None = None
    ttl_seconds: PositiveFloat = 600.0
    max_pending: int = Field(100_000, ge=1)
    horizon: int = Field(1, ge=1, le=10_000)

    @model_validator(mode="after")
    def _check_source(self) -> LabelConfig:
        if self.source == "topic":
            if self.topic is None:
                raise PydanticCustomError("label", "source 'topic' needs label.topic")
            if self.id_field is None:
                raise PydanticCustomError("label", "source 'topic' needs label.id_field")
        elif self.topic is not None:
            raise PydanticCustomError("label", "label.topic is only used with source 'topic'")
        return self

    @property
    def label_id(self) -> str:
        """The id field inside label messages (defaults to ``id_field``)."""
        return self.label_id_field or self.id_field or ""


class ModelConfig(_Section):
    kind: Literal["linear", "mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = [32, 32]
    activation: Literal["relu", "tanh"] = "relu"
    seed: int = 0
    engine: Literal["auto", "fused", "torch"] = "auto"


class OptimizerConfig(_Section):
    """Optimizer and its learning rate (for the population policy: the middle of its grid).

    The default rate depends on the optimizer: 0.1 for SGD (the best fixed rate on 9
    of the 10 benchmark streams with gradient clipping at 1.0), 0.001 for Adam.
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = None  # type: ignore[assignment]  # resolved below
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    clip_norm: PositiveFloat | None = 1.0

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("lr") is None:
            data = {**data, "lr": 0.001 if data.get("name") == "adam" else 0.1}
        return data

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise PydanticCustomError("betas", "expected two numbers in [0, 1)")
        return value


class ScheduleConfig(_Section):
    """The learning-rate policy and its parameters (see :mod:`streamlearn.schedulers`)."""

    policy: Literal["constant", "decay", "drift_reset", "plateau", "hypergradient", "dog", "population"] = (
        "population"
    )
    min_lr: PositiveFloat = 1e-6
    max_lr: PositiveFloat = 1.0
    decay_steps: int = Field(5000, ge=1)  # decay
    decay_power: PositiveFloat = 0.5
    boost: float = Field(5.0, ge=1.0)  # drift_reset
    half_life: int = Field(500, ge=1)
    factor: float = Field(0.5, gt=0.0, lt=1.0)  # plateau
    patience: int = Field(2000, ge=1)
    beta: PositiveFloat = 0.01  # hypergradient
    r_eps: PositiveFloat = 1e-4  # dog
    size: int = Field(5, ge=2, le=16)  # population
    spread: float = Field(3.0, gt=1.0)
    alpha: float = Field(0.01, gt=0.0, le=1.0)
    period: int = Field(500, ge=1)
    by_error: bool = True
    margin: float = Field(0.0, ge=0.0, lt=1.0)
    linear_copies: int = Field(5, ge=0, le=16)  # population, beside an MLP
    kind_alpha: float = Field(0.003, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> ScheduleConfig:
        if self.min_lr > self.max_lr:
            raise PydanticCustomError("bounds", "min_lr must not exceed max_lr")
        if self.linear_copies == 1:
            raise PydanticCustomError("linear_copies", "linear_copies must be 0 (none) or at least 2")
        return self


class DriftConfig(_Section):
    """Drift detection on the prequential loss (see :mod:`streamlearn.monitors`)."""

    # page_hinkley watches the loss (regression) or the 0/1 error (classification);
    # hddm_a and the other binary detectors only see classification errors
    detectors: list[Literal["adwin", "page_hinkley", "kswin", "ddm", "eddm", "hddm_a", "fhddm"]] = [
        "page_hinkley", "hddm_a"
    ]
    grace: int = Field(500, ge=0)
    cooldown: int = Field(1000, ge=0)
    min_agree: int = Field(1, ge=1)
    agree_window: int = Field(100, ge=1)
    rise: float = Field(1.3, ge=1.0)
    params: dict[str, dict[str, float | int | str | bool]] = {}

    @model_validator(mode="after")
    def _check(self) -> DriftConfig:
        if not self.detectors:
            raise PydanticCustomError("detectors", "name at least one detector")
        if self.min_agree > len(self.detectors):
            raise PydanticCustomError("min_agree", "min_agree exceeds the number of detectors")
        unknown = set(self.params) - set(self.detectors)
        if unknown:
            raise PydanticCustomError("params", "params for detectors not listed: {u}", {"u": sorted(unknown)})
        return self


class GuardConfig(_Section):
    """Defences against poisoned input that passes validation (see :mod:`streamlearn.stream`)."""

    outlier_z: PositiveFloat = 8.0  # regression: skip labels further than this many std from the mean
    accept_after: int = Field(100, ge=1)  # ...unless this many in a row: then the level really moved
    rollback: bool = True  # after a loss spike, go back to the last good model if it does clearly better
    snapshot_every: int = Field(100, ge=10)  # labelled readings between snapshots of a healthy model
    trial: int = Field(2000, ge=100)  # readings the snapshot is compared with the live model after a spike
    margin: float = Field(0.7, gt=0.0, lt=1.0)  # roll back when the snapshot's error is below this fraction


class StreamConfig(_Section):
    name: Name
    topic: TopicFilter
    features: Annotated[list[FieldName], Field(min_length=1, max_length=1024)]
    task: Literal["regression", "binary", "multiclass"] = "regression"
    classes: list[str | int] | None = None
    label: LabelConfig
    device: DeviceConfig = DeviceConfig()
    per_device: bool = True
    lags: int = Field(0, ge=0, le=64)
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    drift: DriftConfig = DriftConfig()
    guard: GuardConfig = GuardConfig()
    id_fields: list[FieldName] = []
    sequence_field: FieldName | None = None
    timestamp_field: FieldName | None = None
    max_clock_skew_seconds: PositiveFloat = 3600.0
    ranges: dict[FieldName, tuple[FiniteFloat, FiniteFloat]] = {}
    max_abs_value: PositiveFloat = 1e9
    max_payload_bytes: int = Field(65_536, ge=16, le=16 * 1024 * 1024)
    # a payload field the stream does not name: a dead letter ("reject": the schema changed, maybe the
    # meaning of the features with it) or skipped ("ignore": e.g. firmware that adds an rssi field)
    extra_fields: Literal["reject", "ignore"] = "reject"
    # a reading whose sequence number is below its device's highest and that was never seen: learned
    # late ("learn"; brokers reorder after reconnects) or a dead letter ("dead_letter")
    out_of_order: Literal["learn", "dead_letter"] = "learn"

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        if len(set(self.features)) != len(self.features):
            dup = sorted({f for f in self.features if self.features.count(f) > 1})
            raise PydanticCustomError("features", "duplicate feature names: {dup}", {"dup": dup})
        if self.task == "multiclass" and (self.classes is None or len(self.classes) < 2):
            raise PydanticCustomError("classes", "task 'multiclass' needs at least two classes")
        if self.classes is not None and len(set(map(str, self.classes))) != len(self.classes):
            raise PydanticCustomError("classes", "classes must be distinct")
        if self.task == "binary" and self.classes is not None and len(self.classes) != 2:
            raise PydanticCustomError("classes", "task 'binary' takes exactly two classes")
        if self.label.source == "forecast":
            if self.task != "regression":
                raise PydanticCustomError("label", "source 'forecast' needs task 'regression'")
        elif self.label.field in self.features:
            raise PydanticCustomError(
                "label", "the label field '{f}' is also a feature", {"f": self.label.field}
            )
        if self.sequence_field is not None and self.sequence_field not in self.id_fields:
            raise PydanticCustomError("sequence_field", "sequence_field must be one of id_fields")
        for field, (low, high) in self.ranges.items():
            if low > high:
                raise PydanticCustomError(
                    "ranges", "range of '{f}' is empty: {low} > {high}",
                    {"f": field, "low": low, "high": high},
                )
        return self

    @property
    def n_outputs(self) -> int:
        if self.task == "multiclass":
            assert self.classes is not None
            return len(self.classes)
        return 1


class StoreConfig(_Section):
    path: Path = Path("streamlearn.db")
    synchronous: Literal["normal", "full"] = "full"
    # with "full": fsync on a thread of its own after each COMMIT (messages are acknowledged after
    # it), not inside the COMMIT on the agent's thread
    background_fsync: bool = True
    checkpoint_every_messages: int = Field(1000, ge=1)
    checkpoint_every_seconds: PositiveFloat = 10.0
    # a checkpoint with many changed models (one per device) is written in steps, one per
    # batch of messages, each stopping after this many milliseconds of work
    checkpoint_step_ms: PositiveFloat = 1.0
    # writing checkpoints takes at most this share of the agent's time: with a thousand changed
    # models (~0.2 s to write, in many steps) a flood stretches the interval, and the agent counts
    # it (1: never); a checkpoint written in one step (a few models) never stretches it
    checkpoint_max_share: float = Field(0.1, gt=0.0, le=1.0)
    # with more changed models than this (one per device), an interval's checkpoint writes
    # only this many of them, those unsaved longest first, plus any whose last saved state is
    # checkpoint_replay_max inbox rows behind (at most inbox_retention); the others keep their
    # older row and a restart replays their readings since. A thousand per-device models then
    # cost ~50 model writes per interval instead of 1,000 (~30 KB each with the population
    # policy), and a restart replays at most checkpoint_replay_max rows. Shutdown checkpoints
    # write every changed model; so do streams whose labels come on a topic of their own
    checkpoint_models_max: int = Field(32, ge=1)
    checkpoint_replay_max: int = Field(20_000, ge=1)
    inbox_retention: int = Field(100_000, ge=0)
    dead_letter_retention: int = Field(100_000, ge=0)
    dead_letter_payload_bytes: int = Field(4096, ge=0)


class AgentConfig(_Section):
    gateway: Name = "gateway"
    batch_max: int = Field(512, ge=1, le=65_535)
    # messages arriving within this many ms of the first uncommitted one share its COMMIT (one
    # fsync) and are acknowledged together; predictions do not wait for it. 0: commit each batch
    commit_delay_ms: float = Field(5.0, ge=0.0, le=1000.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # under a backlog (micro_batch_backlog or more messages taken at once: the agent is that
    # far behind; at 1,000 msg/s, 256 is a quarter of a second), a model learns
    # micro_batch_size readings per step (payload labels): each
    # reading's prediction then comes from the model before its micro-batch, not after every
    # earlier reading. ~2.5x less work per reading; 2-9% more error on the benchmark streams
    # while it lasts (README). The rows record it, so a restart replays it exactly. false:
    # strict test-then-train always
    micro_batch: bool = True
    micro_batch_size: int = Field(8, ge=2, le=512)
    micro_batch_backlog: int = Field(256, ge=2, le=65_535)
    # further behind (the batch and what waits behind it), the micro-batch doubles for each
    # further micro_batch_backlog messages, up to this (16 from 512, 32 from 768): in a flood
    # fewer, larger steps cost less CPU per message, for 4-52% more error while it lasts
    # (README). Set it to micro_batch_size to keep one size
    micro_batch_size_max: int = Field(32, ge=2, le=512)

    @model_validator(mode="after")
    def _micro_batch_sizes(self) -> AgentConfig:
        if self.micro_batch_size_max < self.micro_batch_size:
            raise PydanticCustomError(
                "micro_batch", "micro_batch_size_max ({mx}) is below micro_batch_size ({size})",
                {"mx": self.micro_batch_size_max, "size": self.micro_batch_size})
        return self


class Config(_Section):
    agent: AgentConfig = AgentConfig()
    mqtt: MqttConfig = MqttConfig()
    store: StoreConfig = StoreConfig()
    streams: Annotated[list[StreamConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_streams(self) -> Config:
        names = [s.name for s in self.streams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PydanticCustomError("streams", "duplicate stream names: {dup}", {"dup": dup})
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"streamlearn-{self.agent.gateway}"

    def stream(self, name: str) -> StreamConfig:
        for stream in self.streams:
            if stream.name == name:
                return stream
        raise KeyError(name)


# --- errors -----------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys that the section at ``loc`` accepts (for "did you mean")."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        current = _section_type(annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, root: type[BaseModel] = Config) -> str:
    """One line per problem: ``key.path: what was expected, got VALUE``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "missing":
            lines.append(f"{_path(loc)}: required key is missing")
            continue
        if kind == "extra_forbidden":
            known = _known_keys(root, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(f"{_path(loc)}: unknown key{tip}")
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        msg = msg[0].lower() + msg[1:] if msg else msg
        if kind in ("model_type", "dict_type") or isinstance(err.get("input"), dict):
            lines.append(f"{_path(loc)}: {msg}")
        else:
            lines.append(f"{_path(loc)}: {msg}, got {_describe(err.get('input'))}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative paths resolve against ``base_dir``."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def resolve(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return (base_dir / p).resolve()

    store = config.store.model_copy(update={"path": resolve(config.store.path)})
    mqtt = config.mqtt.model_copy(update={"password_file": resolve(config.mqtt.password_file)})
    if config.mqtt.tls is not None:
        tls = config.mqtt.tls
        mqtt = mqtt.model_copy(
            update={
                "tls": tls.model_copy(
                    update={
                        "ca_certs": resolve(tls.ca_certs),
                        "certfile": resolve(tls.certfile),
                        "keyfile": resolve(tls.keyfile),
                    }
                )
            }
        )
    return config.model_copy(update={"store": store, "mqtt": mqtt})


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file.

    Raises
    ------
    ConfigError
        When the file is missing, is not TOML, or does not validate.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: invalid config\n{exc}") from None


def read_password(config: MqttConfig) -> str | None:
    """The broker password, from the config or from ``password_file`` (first line)."""
    if config.password is not None:
        return config.password.get_secret_value()
    if config.password_file is not None:
        try:
            return config.password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {config.password_file}: {exc}") from None
    return None
