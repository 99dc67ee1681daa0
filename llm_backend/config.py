"""Typed settings from the environment and the YAML file of models and backends."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Every environment variable llm-backend reads (gunicorn.conf.py reads HOST, PORT, WEB_CONCURRENCY,
# GRACEFUL_TIMEOUT, GUNICORN_TIMEOUT, KEEPALIVE, FORWARDED_ALLOW_IPS). Deployment checks compare manifests
# against this list.
ENV_VARS = (
    "HOST",
    "PORT",
    "WEB_CONCURRENCY",
    "GRACEFUL_TIMEOUT",
    "GUNICORN_TIMEOUT",
    "KEEPALIVE",
    "FORWARDED_ALLOW_IPS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "LLM_BACKEND_CONFIG",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_DEPLOYMENTS",
    "OPENAI_API_VERSION",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_MODELS",
    "DATABASE_URL",
    "REDIS_URL",
    "LLM_BACKEND_ADMIN_KEY",
    "LLM_BACKEND_AUTH",
    "LLM_BACKEND_RECORDING",
    "RECORD_CONTENT",
    "LLM_BACKEND_DATA_DIR",
    "RECORDER_JOURNAL",
    "RECORDER_MAX_MEMORY_RECORDS",
    "MAX_BODY_BYTES",
    "TRUSTED_PROXIES",
    "LIMITER_FAIL_OPEN",
    "REDIS_TIMEOUT_S",
    "DEFAULT_MAX_TOKENS",
    "UPSTREAM_HTTP_CLIENT",
    "UPSTREAM_TIMEOUT",
    "MOCK_DELAY_MS",
    "CORS_ALLOW_ORIGINS",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "METRICS_TOKEN",
    "CONSOLE_SESSION_TTL",
    # the connection guard (llm_backend/server.py)
    "HEADER_TIMEOUT",
    "BODY_TIMEOUT",
    "MAX_HEADER_BYTES",
    "MAX_CONNECTIONS",
    # tracing (llm_backend/tracing): the OpenTelemetry SDK reads the other OTEL_* itself
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
    "LLM_BACKEND_OTEL_CONTENT_MAX_CHARS",
)

PROVIDERS = ("azure", "openai", "mock")
DEFAULT_MAX_CONNECTIONS = 10_000
STRATEGIES = ("priority", "weighted", "least_busy", "lowest_latency")
AUTH_METHODS = ("api_key", "entra_id")
FAILOVER_CONDITIONS = ("connect", "timeout", "429", "5xx")
DEFAULT_API_VERSION = "2024-10-21"
# `api_version: v1` selects Azure's v1 API: {endpoint}/openai/v1/…, no api-version query, the deployment as
# the body's `model` (any dated version keeps the deployment-style URLs).
AZURE_V1 = "v1"


#: Open WebUI's end-user headers (ENABLE_FORWARD_USER_INFO_HEADERS), the default of TRUSTED_USER_HEADERS.
DEFAULT_TRUSTED_USER_HEADERS: tuple[tuple[str, str], ...] = (
    ("id", "X-OpenWebUI-User-Id"),
    ("email", "X-OpenWebUI-User-Email"),
    ("name", "X-OpenWebUI-User-Name"),
    ("role", "X-OpenWebUI-User-Role"),
)


class ConfigError(Exception):
    """Configuration problems: each one line naming the source, the place and the fix (`problems`); the
    message is those lines, so a file with one mistake gives a one-line message."""

    def __init__(self, *problems: str) -> None:
        self.problems: tuple[str, ...] = problems or ("invalid configuration",)
        super().__init__("\n".join(self.problems))


def _secret_repr(value: str | None) -> str:
    return "None" if value is None else "'***'"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds: connecting, waiting for the first byte, and the whole request."""

    connect: float = 10.0
    first_byte: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream that can serve a model: an Azure deployment, an OpenAI-compatible server or the mock."""

    provider: str
    name: str
    endpoint: str | None = None  # azure: https://<resource>.openai.azure.com
    deployment: str | None = None  # azure: the deployment name
    api_version: str = DEFAULT_API_VERSION  # azure: a dated version, or "v1" for Azure's v1 API
    base_url: str | None = None  # openai: e.g. https://api.openai.com/v1
    model: str | None = None  # openai/mock: the upstream model name (defaults to the client's model)
    api_key: str | None = field(default=None, repr=False)
    auth: str = "api_key"  # api_key | entra_id
    organization: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    priority: int = 0
    weight: float = 1.0
    timeout: Timeouts = field(default_factory=Timeouts)
    max_parallel: int | None = None
    # open connections to this upstream per worker (each stream holds one); more requests wait for one
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # mock only: delay between streamed tokens, in milliseconds
    delay_ms: float = 20.0
    token_scope: str | None = None  # azure + entra_id: the token's scope (default: the API style's)

    @property
    def azure_v1(self) -> bool:
        """An Azure backend reached through the v1 API (`api_version: v1`)."""
        return self.provider == "azure" and self.api_version == AZURE_V1

    def __repr__(self) -> str:  # never print the key
        return (
            f"BackendConfig(provider={self.provider!r}, name={self.name!r}, endpoint={self.endpoint!r}, "
            f"deployment={self.deployment!r}, base_url={self.base_url!r}, api_key={_secret_repr(self.api_key)})"
        )


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a backend's circuit opens: N consecutive failures, or a failure rate over a window."""

    failure_threshold: int = 5
    cooldown: float = 30.0  # seconds open before one probe is let through
    failure_rate: float | None = 0.5  # None: consecutive failures only
    window: float = 60.0  # seconds of outcomes the rate is computed over
    min_requests: int = 10  # outcomes needed in the window before the rate counts


@dataclass(frozen=True, slots=True)
class Prices:
    """What a model costs, in currency units (USD as the providers bill) per million tokens.

    `cached_input` is the price of prompt tokens served from the provider's prompt cache; a models file
    that gives no `cached_input` bills them at `input`."""

    input: float
    cached_input: float
    output: float


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model name clients send, its aliases and the backends that serve it."""

    name: str
    backends: tuple[BackendConfig, ...]
    aliases: tuple[str, ...] = ()
    strategy: str = "priority"
    retries: int = 1  # how many other backends to try after the first
    fail_over_on: tuple[str, ...] = FAILOVER_CONDITIONS
    owned_by: str = "llm-backend"
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    wildcard: bool = False  # forwards any model name (OPENAI_BASE_URL without OPENAI_MODELS)
    context_window: int | None = None  # tokens of prompt + answer the model accepts (models file only)
    max_output_tokens: int | None = None  # the most tokens one answer may have (models file only)
    prices: Prices | None = None  # per million tokens; None: cost is not recorded (models file only)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the app needs to start, read once from the environment."""

    models: tuple[ModelConfig, ...] = ()
    config_source: str = "environment"
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    log_format: str = "text"  # text | json
    database_url: str = "sqlite:///./llm_backend.db"
    redis_url: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)  # GET /metrics needs it as a bearer token
    auth: str = "keys"  # keys | none
    recording: bool = True
    record_content: bool = True
    data_dir: Path = Path("./data")
    # the recorder: journal each request before its answer ends (survives SIGKILL); records kept in memory
    # at most while neither the database nor the journal can take them (then the oldest are dropped, counted)
    recorder_journal: bool = True
    recorder_max_memory_records: int = 50_000
    max_body_bytes: int = 8 * 1024 * 1024
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limiter_fail_open: bool = True
    limiter_lease_s: float = 30.0  # in-flight lease of a request; renewed while it runs
    # connecting to Redis and each of its answers (then LIMITER_FAIL_OPEN applies)
    redis_timeout_s: float = 1.0
    db_connect_timeout_s: float = 3.0  # opening a PostgreSQL connection
    db_statement_timeout_s: float = 5.0  # any statement (PostgreSQL statement_timeout, SQLite busy timeout),
    # and the deadline of each database call a request waits for (key look-ups, budget seeding)
    db_pool_timeout_s: float = 5.0  # waiting for a pooled connection
    key_cache_stale_s: float = 300.0  # a cached key keeps working this long while the database is unreachable
    default_max_tokens: int = 1024
    upstream_http_client: str = "aiohttp"  # aiohttp | httpx
    web_concurrency: int = 1
    cors_allow_origins: tuple[str, ...] = ("*",)  # browser UIs on other origins; () turns CORS off
    # Request headers that name the conversation, first present wins: X-Conversation-Id is our own id,
    # any other (Open WebUI's chat id, a LibreChat `headers:` entry) is the client's chat id, per key.
    conversation_id_headers: tuple[str, ...] = ("X-Conversation-Id", "X-OpenWebUI-Chat-Id")
    # Headers a key marked trusted_ui names its end user with: (field, header) pairs, field one of id,
    # email, name, role; of several headers for one field the first present wins (TRUSTED_USER_HEADERS).
    trusted_user_headers: tuple[tuple[str, str], ...] = DEFAULT_TRUSTED_USER_HEADERS
    # sign-in with an OIDC provider (Entra ID or any other): access tokens on the API, the console's login
    oidc: OidcSettings = field(default_factory=lambda: OidcSettings())
    console_session_ttl_s: float = 12 * 3600.0  # how long a console sign-in lasts (CONSOLE_SESSION_TTL)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        config_path = env.get("LLM_BACKEND_CONFIG")
        if config_path:
            models = load_models_file(Path(config_path), env)
            source = config_path
        else:
            models = models_from_env(env)
            source = "environment"
        return cls(
            models=models,
            config_source=source,
            host=env.get("HOST", "127.0.0.1"),
            port=_int(env, "PORT", 8080),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            log_format=_choice(env, "LOG_FORMAT", "text", ("text", "json")),
            database_url=env.get("DATABASE_URL") or "sqlite:///./llm_backend.db",
            redis_url=env.get("REDIS_URL") or None,
            admin_key=env.get("LLM_BACKEND_ADMIN_KEY") or None,
            metrics_token=env.get("METRICS_TOKEN") or None,
            auth=_choice(env, "LLM_BACKEND_AUTH", "keys", ("keys", "none")),
            recording=_bool(env, "LLM_BACKEND_RECORDING", True),
            record_content=_bool(env, "RECORD_CONTENT", True),
            data_dir=Path(env.get("LLM_BACKEND_DATA_DIR", "./data")),
            recorder_journal=_bool(env, "RECORDER_JOURNAL", True),
            recorder_max_memory_records=_int(env, "RECORDER_MAX_MEMORY_RECORDS", 50_000),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 8 * 1024 * 1024),
            trusted_proxies=_networks(env.get("TRUSTED_PROXIES", "")),
            limiter_fail_open=_bool(env, "LIMITER_FAIL_OPEN", True),
            limiter_lease_s=_seconds(env, "LIMITER_LEASE_S", 30.0),
            redis_timeout_s=_seconds(env, "REDIS_TIMEOUT_S", 1.0),
            db_connect_timeout_s=_seconds(env, "DB_CONNECT_TIMEOUT_S", 3.0),
            db_statement_timeout_s=_seconds(env, "DB_STATEMENT_TIMEOUT_S", 5.0),
            db_pool_timeout_s=_seconds(env, "DB_POOL_TIMEOUT_S", 5.0),
            key_cache_stale_s=_seconds(env, "KEY_CACHE_STALE_S", 300.0),
            default_max_tokens=_int(env, "DEFAULT_MAX_TOKENS", 1024),
            upstream_http_client=_choice(env, "UPSTREAM_HTTP_CLIENT", "aiohttp", ("aiohttp", "httpx")),
            cors_allow_origins=tuple(_split(env.get("CORS_ALLOW_ORIGINS", "*"))),
            conversation_id_headers=tuple(
                _split(env.get("CONVERSATION_ID_HEADERS", "X-Conversation-Id,X-OpenWebUI-Chat-Id"))
            ),
            trusted_user_headers=trusted_user_headers(env.get("TRUSTED_USER_HEADERS")),
            web_concurrency=_int(env, "WEB_CONCURRENCY", min(os.cpu_count() or 1, 4)),  # as gunicorn.conf.py
            oidc=oidc_settings_from_env(env),
            console_session_ttl_s=_session_ttl(env, "CONSOLE_SESSION_TTL", 12 * 3600.0),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment: {name}={raw!r} is not an integer; set it to a whole number"
        ) from None


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"environment: {name}={raw!r} is not a positive number of seconds")
    return value


def _session_ttl(env: Mapping[str, str], name: str, default: float) -> float:
    """A lifetime of one minute to 30 days: a duration (30m, 12h, 7d) or a number of seconds."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    from llm_backend.durations import parse_duration

    try:
        value = float(raw) if raw.replace(".", "", 1).isdigit() else parse_duration(raw).total_seconds()
    except ValueError:
        value = -1.0
    if not 60 <= value <= 30 * 86400:
        raise ConfigError(
            f"environment: {name}={raw!r} is not a session lifetime between 1 minute and 30 days; "
            "write e.g. 30m, 12h, 7d or a number of seconds"
        )
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment: {name}={raw!r} is not a boolean; use true or false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"environment: {name}={raw!r} is not one of {', '.join(choices)}")
    return value


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for part in raw.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(
                f"environment: TRUSTED_PROXIES has {part!r}, which is not an IP address or CIDR range"
            ) from None
    return tuple(nets)


TRUSTED_USER_FIELDS = ("id", "email", "name", "role")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def trusted_user_headers(raw: str | None) -> tuple[tuple[str, str], ...]:
    """TRUSTED_USER_HEADERS: comma-separated field=Header pairs (fields id, email, name, role; id is
    required; a field may be given several headers, the first present wins). Empty or unset: Open WebUI's
    X-OpenWebUI-User-Id, -Email, -Name and -Role."""
    if raw is None or not raw.strip():
        return DEFAULT_TRUSTED_USER_HEADERS
    pairs: list[tuple[str, str]] = []
    for part in _split(raw):
        field, sep, header = (p.strip() for p in part.partition("="))
        if not sep or field.lower() not in TRUSTED_USER_FIELDS or not _HEADER_NAME.match(header):
            raise ConfigError(
                f"environment: TRUSTED_USER_HEADERS entry {part!r} is not field=Header-Name with field one "
                f"of {', '.join(TRUSTED_USER_FIELDS)}"
            )
        pairs.append((field.lower(), header))
    if not any(f == "id" for f, _ in pairs):
        raise ConfigError("environment: TRUSTED_USER_HEADERS names no header for the user's id (id=Header)")
    return tuple(pairs)


def _split(raw: str) -> list[str]:
    return [p.strip() for p in raw.split(",") if p.strip()]


def models_from_env(env: Mapping[str, str]) -> tuple[ModelConfig, ...]:
    """The simple case: one Azure resource's deployments and/or one OpenAI-compatible server."""
    models: list[ModelConfig] = []
    endpoint = env.get("AZURE_OPENAI_ENDPOINT")
    if endpoint:
        api_key = env.get("AZURE_OPENAI_API_KEY") or None
        if not api_key:
            raise ConfigError(
                "environment: AZURE_OPENAI_ENDPOINT is set but AZURE_OPENAI_API_KEY is not; set the key "
                "(or use LLM_BACKEND_CONFIG with auth: entra_id)"
            )
        deployments = _split(env.get("AZURE_OPENAI_DEPLOYMENTS", ""))
        if not deployments:
            raise ConfigError(
                "environment: AZURE_OPENAI_ENDPOINT is set but AZURE_OPENAI_DEPLOYMENTS is empty; list the "
                "deployments to expose, e.g. AZURE_OPENAI_DEPLOYMENTS=gpt-4o,gpt-35-turbo (or model=deployment)"
            )
        api_version = env.get("OPENAI_API_VERSION") or DEFAULT_API_VERSION
        for item in deployments:
            name, _, deployment = item.partition("=")
            name, deployment = name.strip(), (deployment.strip() or name.strip())
            backend = BackendConfig(
                provider="azure",
                name=f"azure:{deployment}",
                endpoint=endpoint.rstrip("/"),
                deployment=deployment,
                api_version=api_version,
                api_key=api_key,
            )
            models.append(ModelConfig(name=name, backends=(backend,)))
    base_url = env.get("OPENAI_BASE_URL")
    openai_key = env.get("OPENAI_API_KEY")
    if openai_key or base_url:
        url = (base_url or "https://api.openai.com/v1").rstrip("/")
        names = _split(env.get("OPENAI_MODELS", ""))
        if names:
            for name in names:
                backend = BackendConfig(
                    provider="openai", name=f"openai:{name}", base_url=url, api_key=openai_key
                )
                models.append(ModelConfig(name=name, backends=(backend,)))
        else:
            backend = BackendConfig(provider="openai", name="openai", base_url=url, api_key=openai_key)
            models.append(ModelConfig(name="*", backends=(backend,), wildcard=True))
    if not models:
        raise ConfigError(
            "environment: no models configured; set LLM_BACKEND_CONFIG to a models YAML file (config/demo.yaml "
            "serves the built-in mock), or AZURE_OPENAI_ENDPOINT + AZURE_OPENAI_API_KEY + "
            "AZURE_OPENAI_DEPLOYMENTS, or OPENAI_API_KEY / OPENAI_BASE_URL"
        )
    env_problems = _Problems("environment")
    places = {"azure": "AZURE_OPENAI_DEPLOYMENTS", "openai": "OPENAI_MODELS"}
    _check_unique([(places[m.backends[0].provider], m) for m in models], env_problems)
    env_problems.raise_if_any()
    return tuple(models)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Problems:
    """The problems found in one source, collected so that a file's every mistake is reported at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, place: str, message: str) -> None:
        self.lines.append(f"{self.source}: {place}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(*self.lines)


def _suggest(word: Any, choices: Iterable[str]) -> str | None:
    """The closest of `choices` to a misspelt `word`, if one is close enough to be a likely typo."""
    if not isinstance(word, str):
        return None
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _not_one_of(value: Any, what: str, choices: Sequence[str]) -> str:
    """`'azur' is not a provider; did you mean 'azure'? (use one of azure, openai, mock)`."""
    listed = ", ".join(choices)
    hint = _suggest(value, choices)
    if hint:
        return f"{value!r} {what}; did you mean {hint!r}? (use one of {listed})"
    return f"{value!r} {what}; use one of {listed}"


def _unknown_keys(raw: Mapping[Any, Any], allowed: Collection[str], where: str, p: _Problems) -> set[str]:
    """One problem per unknown key, with the key it most likely meant; returns those meant keys."""
    meant: set[str] = set()
    for key in sorted(set(raw) - set(allowed), key=str):
        hint = _suggest(key, allowed)
        if hint:
            meant.add(hint)
            p.add(f"{where}.{key}", f"unknown key; did you mean {hint!r}?")
        else:
            p.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return meant


def _interpolate(value: Any, env: Mapping[str, str], where: str, unset: list[tuple[str, str]]) -> Any:
    """`${VAR}` and `${VAR:-default}` in strings, at any depth; each unset variable is noted in `unset` as
    (place, name) and left as written."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            unset.append((where, name))
            return m.group(0)

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]", unset) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}", unset) for k, v in value.items()}
    return value


def load_models_file(path: Path, env: Mapping[str, str]) -> tuple[ModelConfig, ...]:
    """Read and validate the models YAML; every problem found becomes one line of a single ConfigError."""
    source = str(path)
    p = _Problems(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read the models file ({exc.strerror}); check the path (LLM_BACKEND_CONFIG)"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {place}: invalid YAML ({problem}); fix the syntax there") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        misspelt = (
            [k for k in doc if k != "models" and _suggest(k, ["models"])] if isinstance(doc, dict) else []
        )
        fix = f"; did you mean 'models' for {misspelt[0]!r}?" if misspelt else ""
        raise ConfigError(f"{source}: top level: expected a mapping with a non-empty 'models:' list{fix}")
    models: list[tuple[str, ModelConfig]] = []
    for i, raw in enumerate(doc["models"]):
        model = _parse_model(raw, i, env, p)
        if model is not None:
            models.append((f"models[{i}] ({model.name})", model))
    _check_unique(models, p)
    p.raise_if_any()
    return tuple(m for _, m in models)


_MODEL_KEYS = {
    "name",
    "aliases",
    "backends",
    "strategy",
    "retries",
    "fail_over_on",
    "owned_by",
    "circuit_breaker",
    "context_window",
    "max_output_tokens",
    "prices",
}
_META_KEYS = ("context_window", "max_output_tokens", "prices")
_PRICE_KEYS = ("input", "cached_input", "output")
_PRICE_MAX = 1_000_000  # per million tokens: one currency unit per token, far above any price sold
_BREAKER_KEYS = {"failure_threshold", "cooldown", "failure_rate", "window", "min_requests"}
_TIMEOUT_KEYS = {"connect", "first_byte", "total"}
_BACKEND_KEYS = {
    "provider",
    "name",
    "endpoint",
    "deployment",
    "api_version",
    "base_url",
    "model",
    "api_key",
    "auth",
    "organization",
    "headers",
    "priority",
    "weight",
    "timeout",
    "max_parallel",
    "max_connections",
    "delay_ms",
    "token_scope",
}


def _whole(value: Any, where: str, p: _Problems, *, minimum: int, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        p.add(where, f"expected a whole number >= {minimum}")
        return default
    return value


def _parse_model(raw: Any, index: int, env: Mapping[str, str], p: _Problems) -> ModelConfig | None:
    """One entry of `models:`, its problems noted in `p`; None when it has no name."""
    where = f"models[{index}]"
    if not isinstance(raw, dict):
        p.add(where, "expected a mapping with name and backends")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        p.add(where, "'name' is missing; give the model name clients send")
        name = None
    else:
        where = f"models[{index}] ({name})"
    meant = _unknown_keys(raw, _MODEL_KEYS, where, p)
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        p.add(f"{where}.aliases", "expected a list of model names")
        aliases = []
    strategy = raw.get("strategy", "priority")
    if strategy not in STRATEGIES:
        p.add(f"{where}.strategy", _not_one_of(strategy, "is unknown", STRATEGIES))
    retries = _whole(raw.get("retries", 1), f"{where}.retries", p, minimum=0, default=1)
    fail_over_on = raw.get("fail_over_on", list(FAILOVER_CONDITIONS))
    if not isinstance(fail_over_on, list):
        p.add(f"{where}.fail_over_on", f"expected a list of {', '.join(FAILOVER_CONDITIONS)}")
        fail_over_on = []
    for k, condition in enumerate(fail_over_on):
        if str(condition) not in FAILOVER_CONDITIONS:
            p.add(
                f"{where}.fail_over_on[{k}]",
                _not_one_of(str(condition), "is not a failover condition", FAILOVER_CONDITIONS),
            )
    backends_raw = raw.get("backends")
    backends: list[BackendConfig] = []
    if not isinstance(backends_raw, list) or not backends_raw:
        if "backends" in raw or "backends" not in meant:  # a misspelt key has had its line already
            p.add(where, "'backends' is missing or empty; list at least one backend")
    else:
        for j, b in enumerate(backends_raw):
            backend = _parse_backend(b, f"{where}.backends[{j}]", name or where, j, env, p)
            if backend is not None:
                backends.append(backend)
        seen: set[str] = set()
        for b in backends:
            if b.name in seen:
                p.add(
                    where,
                    f"backend name {b.name!r} is used twice; backend names must be unique within a model",
                )
            seen.add(b.name)
    breaker = _parse_breaker(raw.get("circuit_breaker"), f"{where}.circuit_breaker", p)
    # the metadata may come from the environment (${VAR}), as backend settings do
    unset: list[tuple[str, str]] = []
    meta = {k: _interpolate(raw.get(k), env, f"{where}.{k}", unset) for k in _META_KEYS}
    for place, var in dict.fromkeys(unset):
        p.add(place, f"uses ${{{var}}} but {var} is not set; export {var} (or write ${{{var}:-default}})")
    for key in {place.removeprefix(f"{where}.").split(".", 1)[0] for place, _ in unset}:
        meta[key] = None  # said already
    context_window = _tokens(meta["context_window"], f"{where}.context_window", p)
    max_output_tokens = _tokens(meta["max_output_tokens"], f"{where}.max_output_tokens", p)
    if context_window is not None and max_output_tokens is not None and max_output_tokens > context_window:
        p.add(
            f"{where}.max_output_tokens",
            f"{max_output_tokens} is more than context_window ({context_window}); an answer cannot be longer "
            "than the window it shares with the prompt",
        )
    prices = _parse_prices(meta["prices"], f"{where}.prices", p)
    if name is None:
        return None
    # returned even when something above was wrong (the loader then raises), so that name clashes with
    # the other models are reported in the same run
    return ModelConfig(
        name=name,
        breaker=breaker,
        aliases=tuple(aliases),
        backends=tuple(backends),
        strategy=strategy,
        retries=retries,
        fail_over_on=tuple(str(c) for c in fail_over_on),
        owned_by=str(raw.get("owned_by", "llm-backend")),
        context_window=context_window,
        max_output_tokens=max_output_tokens,
        prices=prices,
    )


def _tokens(value: Any, where: str, p: _Problems) -> int | None:
    """An optional token count (context_window, max_output_tokens): a whole number >= 1, or absent."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():  # after ${VAR} interpolation
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        p.add(where, f"expected a whole number of tokens >= 1, not {value!r}")
        return None
    return value


def _price(value: Any, where: str, p: _Problems) -> float | None:
    """One price per million tokens: a finite number >= 0 (a numeric string after ${VAR} interpolation)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            sign = value.strip()[:1] in ("$", "€", "£") and not value.strip().startswith("${")
            hint = " (write the number alone, without a currency sign)" if sign else ""
            p.add(where, f"expected a price per million tokens (a number >= 0), not {value!r}{hint}")
            return None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        p.add(where, f"expected a price per million tokens (a number >= 0), not {value!r}")
        return None
    if number < 0:
        p.add(where, f"a price cannot be negative ({value!r}); use 0 for a free model")
        return None
    if number > _PRICE_MAX:
        p.add(
            where, f"{number:g} per million tokens is more than a unit per token; give the price per million"
        )
        return None
    return float(number)


def _parse_prices(raw: Any, where: str, p: _Problems) -> Prices | None:
    """`prices: {input, cached_input, output}` per million tokens; input and output are required,
    cached_input defaults to input (a provider without a prompt-cache discount)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        p.add(where, "expected a mapping of input, cached_input and output (per million tokens)")
        return None
    meant = _unknown_keys(raw, _PRICE_KEYS, where, p)
    found: dict[str, float | None] = {}
    for key in _PRICE_KEYS:
        if key in raw:
            found[key] = _price(raw[key], f"{where}.{key}", p)
        elif key != "cached_input" and key not in meant:  # a misspelt key has had its line already
            p.add(where, f"{key!r} is missing; give the {key} price per million tokens")
    input_price, output_price = found.get("input"), found.get("output")
    if input_price is None or output_price is None:
        return None
    cached = found.get("cached_input", input_price)
    if cached is None:
        return None
    return Prices(input=input_price, cached_input=cached, output=output_price)


def _parse_breaker(raw: Any, where: str, p: _Problems) -> BreakerConfig:
    d = BreakerConfig()
    if raw is None:
        return d
    if not isinstance(raw, dict):
        p.add(where, f"expected a mapping of {', '.join(sorted(_BREAKER_KEYS))}")
        return d
    _unknown_keys(raw, _BREAKER_KEYS, where, p)
    rate = raw.get("failure_rate", d.failure_rate)
    if rate is not None:
        rate = _number(rate, f"{where}.failure_rate", p, default=d.failure_rate or 0.5)
        if not 0 < rate <= 1:
            p.add(f"{where}.failure_rate", "expected a fraction in (0, 1], or null")
    return BreakerConfig(
        failure_threshold=_whole(
            raw.get("failure_threshold", d.failure_threshold),
            f"{where}.failure_threshold",
            p,
            minimum=1,
            default=d.failure_threshold,
        ),
        cooldown=_number(raw.get("cooldown", d.cooldown), f"{where}.cooldown", p, default=d.cooldown),
        failure_rate=rate,
        window=_number(raw.get("window", d.window), f"{where}.window", p, minimum=0.001, default=d.window),
        min_requests=_whole(
            raw.get("min_requests", d.min_requests),
            f"{where}.min_requests",
            p,
            minimum=1,
            default=d.min_requests,
        ),
    )


def _number(value: Any, where: str, p: _Problems, *, minimum: float = 0.0, default: float = 0.0) -> float:
    if isinstance(value, str):  # after ${VAR} interpolation
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        p.add(where, f"expected a number >= {minimum:g}")
        return default
    return float(value)


def _parse_timeout(raw: Any, where: str, p: _Problems) -> Timeouts:
    d = Timeouts()
    if raw is None:
        return d
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        total = _number(raw, where, p, minimum=0.001, default=d.total)
        return Timeouts(connect=min(10.0, total), first_byte=total, total=total)
    if not isinstance(raw, dict):
        p.add(where, f"expected seconds or a mapping of {', '.join(sorted(_TIMEOUT_KEYS))}")
        return d
    _unknown_keys(raw, _TIMEOUT_KEYS, where, p)
    return Timeouts(
        connect=_number(
            raw.get("connect", d.connect), f"{where}.connect", p, minimum=0.001, default=d.connect
        ),
        first_byte=_number(
            raw.get("first_byte", d.first_byte), f"{where}.first_byte", p, minimum=0.001, default=d.first_byte
        ),
        total=_number(raw.get("total", d.total), f"{where}.total", p, minimum=0.001, default=d.total),
    )


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _parse_backend(
    raw: Any, where: str, model: str, index: int, env: Mapping[str, str], p: _Problems
) -> BackendConfig | None:
    """One backend of a model; None (with its problems noted) when it cannot be used."""
    if not isinstance(raw, dict):
        p.add(where, "expected a mapping with provider and its settings")
        return None
    found_before = len(p.lines)
    meant = _unknown_keys(raw, _BACKEND_KEYS, where, p)
    unset: list[tuple[str, str]] = []
    raw = {k: _interpolate(v, env, f"{where}.{k}", unset) for k, v in raw.items()}
    for place, name in dict.fromkeys(unset):
        p.add(place, f"uses ${{{name}}} but {name} is not set; export {name} (or write ${{{name}:-default}})")
    # a value whose variable is unset, or a key that was misspelt, has had its line already: checking it
    # further would only say the same thing again
    said = meant | {place.removeprefix(f"{where}.").split(".", 1)[0].split("[", 1)[0] for place, _ in unset}

    def check(key: str) -> bool:
        return key not in said

    provider = raw.get("provider")
    if provider not in PROVIDERS and check("provider"):
        p.add(f"{where}.provider", _not_one_of(provider, "is not a provider", PROVIDERS))
    auth = raw.get("auth", "api_key")
    if auth not in AUTH_METHODS and check("auth"):
        p.add(f"{where}.auth", _not_one_of(auth, "is unknown", AUTH_METHODS))
    api_key = raw.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        p.add(f"{where}.api_key", "expected a string (quote it)")
    api_version = str(raw.get("api_version") or DEFAULT_API_VERSION)
    endpoint = raw.get("endpoint")
    deployment = raw.get("deployment")
    base_url = raw.get("base_url")
    default_name = f"{model}@mock"
    if provider == "azure":
        if not _is_url(endpoint) and check("endpoint"):
            p.add(f"{where}.endpoint", "an azure backend needs endpoint: https://<resource>.openai.azure.com")
        if not deployment and check("deployment"):
            p.add(f"{where}.deployment", "an azure backend needs the deployment name")
        if auth == "api_key" and not api_key and check("api_key"):
            p.add(
                f"{where}.api_key",
                "an azure backend with auth: api_key needs api_key (e.g. api_key: ${AZURE_OPENAI_API_KEY}) "
                "or auth: entra_id",
            )
        if _is_url(endpoint):
            default_name = f"{model}@{_host(endpoint)}/{deployment}"
    elif provider == "openai":
        if base_url is None:
            base_url = "https://api.openai.com/v1"
        if not _is_url(base_url) and check("base_url"):
            p.add(f"{where}.base_url", "expected an http(s) URL such as https://api.openai.com/v1")
        if auth == "entra_id":
            p.add(f"{where}.auth", "entra_id is only for azure backends")
        if _is_url(base_url):
            default_name = f"{model}@{_host(base_url)}"
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        p.add(f"{where}.headers", "expected a mapping of header names to values")
        headers = {}
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None:
        max_parallel = _whole(max_parallel, f"{where}.max_parallel", p, minimum=1, default=1)
    # connections to this upstream per worker
    max_connections = _whole(
        raw.get("max_connections", DEFAULT_MAX_CONNECTIONS),
        f"{where}.max_connections",
        p,
        minimum=1,
        default=DEFAULT_MAX_CONNECTIONS,
    )
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        p.add(f"{where}.priority", "expected a whole number (lower is tried first)")
    weight = _number(raw.get("weight", 1), f"{where}.weight", p, minimum=0.0, default=1.0)
    timeout = _parse_timeout(raw.get("timeout"), f"{where}.timeout", p)
    delay_ms = _number(raw.get("delay_ms", 20), f"{where}.delay_ms", p, default=20.0)
    if len(p.lines) > found_before:
        return None
    return BackendConfig(
        provider=provider,
        name=str(raw.get("name") or (default_name if index == 0 else f"{default_name}#{index}")),
        endpoint=endpoint.rstrip("/") if isinstance(endpoint, str) else None,
        deployment=str(deployment) if deployment else None,
        api_version=api_version,
        base_url=base_url.rstrip("/") if isinstance(base_url, str) else None,
        model=str(raw["model"]) if raw.get("model") else None,
        api_key=api_key,
        auth=auth,
        organization=raw.get("organization"),
        headers={str(k): str(v) for k, v in headers.items()},
        priority=priority,
        weight=weight,
        timeout=timeout,
        max_parallel=max_parallel,
        max_connections=max_connections,
        delay_ms=delay_ms,
        token_scope=str(raw["token_scope"]) if raw.get("token_scope") else None,
    )


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def _check_unique(models: Sequence[tuple[str, ModelConfig]], p: _Problems) -> None:
    """Names and aliases must be unique across models; `models` pairs each with the place it came from."""
    seen: dict[str, str] = {}
    for place, m in models:
        for n in (m.name, *m.aliases):
            if n in seen:
                p.add(
                    place, f"model name {n!r} is already used by {seen[n]}; names and aliases must be unique"
                )
            else:
                seen[n] = place


# -- OIDC sign-in --------------------------------------------------------------------------------------

#: Asymmetric signature algorithms only: `none` and the HMAC ones (HS*) are never accepted, since a
#: server that verifies HS256 with a published key accepts tokens anyone can make.
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
OIDC_DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
#: Entra ID's multi-tenant discovery documents (common, organizations) and what they are issued for
_ENTRA_MULTI_TENANT = re.compile(
    r"^https://login\.(microsoftonline\.(com|us)|partner\.microsoftonline\.cn)/(common|organizations)(/|$)",
    re.I,
)


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """The OIDC provider whose tokens sign callers in (OIDC_* variables); off while `issuer` is None."""

    issuer: str | None = None  # OIDC_ISSUER: discovery is {issuer}/.well-known/openid-configuration
    audience: tuple[str, ...] = ()  # OIDC_AUDIENCE: accepted `aud` values of access tokens
    allowed_tenants: tuple[str, ...] = ()  # OIDC_ALLOWED_TENANTS: Entra tenant ids; "*" any (multi-tenant)
    algorithms: tuple[str, ...] = OIDC_DEFAULT_ALGORITHMS  # OIDC_ALGORITHMS
    leeway_s: float = 60.0  # OIDC_LEEWAY_S: clock skew allowed on exp, nbf and iat
    jwks_ttl_s: float = 3600.0  # OIDC_JWKS_TTL_S: keys are fetched again (in the background) this often
    jwks_min_refresh_s: float = 30.0  # OIDC_JWKS_MIN_REFRESH_S: at most one refetch per this for unknown kids
    http_timeout_s: float = 5.0  # OIDC_HTTP_TIMEOUT_S: each call to the provider (discovery, keys, token)
    # the console's sign-in (authorization code + PKCE)
    client_id: str | None = None  # OIDC_CLIENT_ID
    client_secret: str | None = field(default=None, repr=False)  # OIDC_CLIENT_SECRET (confidential clients)
    redirect_url: str | None = None  # OIDC_REDIRECT_URL; default: derived from the request
    scopes: tuple[str, ...] = ("openid", "profile", "email")  # OIDC_SCOPES
    admin_groups: tuple[str, ...] = ()  # OIDC_ADMIN_GROUPS: members may use the console as admins
    admin_roles: tuple[str, ...] = ()  # OIDC_ADMIN_ROLES: holders (Entra app roles) likewise

    @property
    def enabled(self) -> bool:
        return self.issuer is not None

    @property
    def console_enabled(self) -> bool:
        return self.issuer is not None and self.client_id is not None


def oidc_settings_from_env(env: Mapping[str, str]) -> OidcSettings:
    issuer = (env.get("OIDC_ISSUER") or "").strip() or None
    problems: list[str] = []
    if issuer is not None and not _is_https_or_local(issuer):
        problems.append(
            f"environment: OIDC_ISSUER={issuer!r} is not an https URL (plain http only for localhost)"
        )
    client_id = (env.get("OIDC_CLIENT_ID") or "").strip() or None
    # an access token for the console's own app registration (Entra v2: scope {client id}/.default) has
    # the client id as its audience
    audience = tuple(_split(env.get("OIDC_AUDIENCE", ""))) or ((client_id,) if client_id else ())
    if issuer is not None and not audience:
        problems.append(
            "environment: OIDC_ISSUER is set but OIDC_AUDIENCE is not; set it to the application ID URI and/or "
            "client id your tokens are issued for (e.g. api://llm-backend), or any token of the issuer would do"
        )
    algorithms = tuple(_split(env.get("OIDC_ALGORITHMS", ""))) or OIDC_DEFAULT_ALGORITHMS
    by_upper = {a.upper(): a for a in OIDC_ALGORITHMS}
    bad = [a for a in algorithms if a.upper() not in by_upper]
    if bad:
        problems.append(
            f"environment: OIDC_ALGORITHMS has {', '.join(bad)}; allowed are {', '.join(OIDC_ALGORITHMS)} "
            "(never none or HS*)"
        )
    algorithms = tuple(by_upper[a.upper()] for a in algorithms if a.upper() in by_upper)
    tenants = tuple(t.lower() for t in _split(env.get("OIDC_ALLOWED_TENANTS", "")))
    if issuer is not None and _ENTRA_MULTI_TENANT.match(issuer) and not tenants:
        problems.append(
            f"environment: OIDC_ISSUER={issuer!r} accepts every Entra ID tenant; list the ones to accept in "
            "OIDC_ALLOWED_TENANTS (tenant ids, or * for any)"
        )
    redirect = (env.get("OIDC_REDIRECT_URL") or "").strip() or None
    if redirect is not None and not _is_https_or_local(redirect):
        problems.append(f"environment: OIDC_REDIRECT_URL={redirect!r} is not an https URL")
    if problems:
        raise ConfigError(*problems)
    return OidcSettings(
        issuer=issuer.rstrip("/") if issuer else None,
        audience=audience,
        allowed_tenants=tenants,
        algorithms=algorithms,
        leeway_s=_non_negative(env, "OIDC_LEEWAY_S", 60.0),
        jwks_ttl_s=_seconds(env, "OIDC_JWKS_TTL_S", 3600.0),
        jwks_min_refresh_s=_seconds(env, "OIDC_JWKS_MIN_REFRESH_S", 30.0),
        http_timeout_s=_seconds(env, "OIDC_HTTP_TIMEOUT_S", 5.0),
        client_id=client_id,
        client_secret=env.get("OIDC_CLIENT_SECRET") or None,
        redirect_url=redirect,
        scopes=tuple(_split(env.get("OIDC_SCOPES", "").replace(" ", ","))) or ("openid", "profile", "email"),
        admin_groups=tuple(_split(env.get("OIDC_ADMIN_GROUPS", ""))),
        admin_roles=tuple(_split(env.get("OIDC_ADMIN_ROLES", ""))),
    )


def _is_https_or_local(url: str) -> bool:
    lowered = url.lower()
    if lowered.startswith("https://"):
        return len(lowered) > len("https://")
    host = lowered.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return lowered.startswith("http://") and host in ("localhost", "127.0.0.1", "::1")


def _non_negative(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"environment: {name}={raw!r} is not a number of seconds (0 or more)")
    return value
