"""Typed settings from the environment and the YAML file of models and backends."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
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
    "MAX_BODY_BYTES",
    "TRUSTED_PROXIES",
    "LIMITER_FAIL_OPEN",
    "DEFAULT_MAX_TOKENS",
    "UPSTREAM_HTTP_CLIENT",
    "UPSTREAM_TIMEOUT",
    "MOCK_DELAY_MS",
    "CORS_ALLOW_ORIGINS",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
)

PROVIDERS = ("azure", "openai", "mock")
STRATEGIES = ("priority", "weighted", "least_busy", "lowest_latency")
AUTH_METHODS = ("api_key", "entra_id")
FAILOVER_CONDITIONS = ("connect", "timeout", "429", "5xx")
DEFAULT_API_VERSION = "2024-10-21"
# `api_version: v1` selects Azure's v1 API: {endpoint}/openai/v1/…, no api-version query, the deployment as
# the body's `model` (any dated version keeps the deployment-style URLs).
AZURE_V1 = "v1"


class ConfigError(Exception):
    """A configuration problem; its message is one line naming the source, the place and the fix."""


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
    auth: str = "keys"  # keys | none
    recording: bool = True
    record_content: bool = True
    data_dir: Path = Path("./data")
    max_body_bytes: int = 8 * 1024 * 1024
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limiter_fail_open: bool = True
    default_max_tokens: int = 1024
    upstream_http_client: str = "aiohttp"  # aiohttp | httpx
    web_concurrency: int = 1
    cors_allow_origins: tuple[str, ...] = ("*",)  # browser UIs on other origins; () turns CORS off

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
            auth=_choice(env, "LLM_BACKEND_AUTH", "keys", ("keys", "none")),
            recording=_bool(env, "LLM_BACKEND_RECORDING", True),
            record_content=_bool(env, "RECORD_CONTENT", True),
            data_dir=Path(env.get("LLM_BACKEND_DATA_DIR", "./data")),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 8 * 1024 * 1024),
            trusted_proxies=_networks(env.get("TRUSTED_PROXIES", "")),
            limiter_fail_open=_bool(env, "LIMITER_FAIL_OPEN", True),
            default_max_tokens=_int(env, "DEFAULT_MAX_TOKENS", 1024),
            upstream_http_client=_choice(env, "UPSTREAM_HTTP_CLIENT", "aiohttp", ("aiohttp", "httpx")),
            cors_allow_origins=tuple(_split(env.get("CORS_ALLOW_ORIGINS", "*"))),
            web_concurrency=_int(env, "WEB_CONCURRENCY", min(os.cpu_count() or 1, 4)),  # as gunicorn.conf.py
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
    _check_unique(models, "environment")
    return tuple(models)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], where: str, source: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{source}: {where} uses ${{{name}}} but {name} is not set; export {name} "
                f"(or write ${{{name}:-default}})"
            )

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}", source) for k, v in value.items()}
    return value


def load_models_file(path: Path, env: Mapping[str, str]) -> tuple[ModelConfig, ...]:
    """Read and validate the models YAML; every problem raises ConfigError with a one-line message."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read the models file ({exc.strerror}); fix LLM_BACKEND_CONFIG"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {place}: invalid YAML ({problem}); fix the syntax there") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ConfigError(f"{source}: top level: expected a mapping with a non-empty 'models:' list")
    models = [_parse_model(raw, i, env, source) for i, raw in enumerate(doc["models"])]
    _check_unique(models, source)
    return tuple(models)


_MODEL_KEYS = {
    "name",
    "aliases",
    "backends",
    "strategy",
    "retries",
    "fail_over_on",
    "owned_by",
    "circuit_breaker",
}
_BREAKER_KEYS = {"failure_threshold", "cooldown", "failure_rate", "window", "min_requests"}
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
    "delay_ms",
    "token_scope",
}


def _parse_model(raw: Any, index: int, env: Mapping[str, str], source: str) -> ModelConfig:
    where = f"models[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping with name and backends")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: {where}: 'name' is missing; give the model name clients send")
    where = f"models[{index}] ({name})"
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"{source}: {where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_MODEL_KEYS))}"
        )
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{source}: {where}.aliases: expected a list of model names")
    strategy = raw.get("strategy", "priority")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"{source}: {where}.strategy: {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}"
        )
    retries = raw.get("retries", 1)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError(f"{source}: {where}.retries: expected a whole number >= 0")
    fail_over_on = raw.get("fail_over_on", list(FAILOVER_CONDITIONS))
    if not isinstance(fail_over_on, list) or any(str(c) not in FAILOVER_CONDITIONS for c in fail_over_on):
        raise ConfigError(
            f"{source}: {where}.fail_over_on: expected a list of {', '.join(FAILOVER_CONDITIONS)}"
        )
    backends_raw = raw.get("backends")
    if not isinstance(backends_raw, list) or not backends_raw:
        raise ConfigError(f"{source}: {where}: 'backends' is missing or empty; list at least one backend")
    backends = tuple(
        _parse_backend(b, f"{where}.backends[{j}]", name, j, env, source) for j, b in enumerate(backends_raw)
    )
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: {where}: backend names must be unique within a model")
    breaker = _parse_breaker(raw.get("circuit_breaker"), f"{where}.circuit_breaker", source)
    return ModelConfig(
        name=name,
        breaker=breaker,
        aliases=tuple(aliases),
        backends=backends,
        strategy=strategy,
        retries=retries,
        fail_over_on=tuple(str(c) for c in fail_over_on),
        owned_by=str(raw.get("owned_by", "llm-backend")),
    )


def _parse_breaker(raw: Any, where: str, source: str) -> BreakerConfig:
    if raw is None:
        return BreakerConfig()
    if not isinstance(raw, dict) or set(raw) - _BREAKER_KEYS:
        raise ConfigError(f"{source}: {where}: expected a mapping of {', '.join(sorted(_BREAKER_KEYS))}")
    d = BreakerConfig()
    threshold = raw.get("failure_threshold", d.failure_threshold)
    min_requests = raw.get("min_requests", d.min_requests)
    for key, value in (("failure_threshold", threshold), ("min_requests", min_requests)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: {where}.{key}: expected a whole number >= 1")
    rate = raw.get("failure_rate", d.failure_rate)
    if rate is not None:
        rate = _number(rate, f"{where}.failure_rate", source)
        if not 0 < rate <= 1:
            raise ConfigError(f"{source}: {where}.failure_rate: expected a fraction in (0, 1], or null")
    return BreakerConfig(
        failure_threshold=threshold,
        cooldown=_number(raw.get("cooldown", d.cooldown), f"{where}.cooldown", source),
        failure_rate=rate,
        window=_number(raw.get("window", d.window), f"{where}.window", source, minimum=0.001),
        min_requests=min_requests,
    )


def _number(value: Any, where: str, source: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, str):  # after ${VAR} interpolation
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"{source}: {where}: expected a number >= {minimum:g}")
    return float(value)


def _parse_timeout(raw: Any, where: str, source: str) -> Timeouts:
    if raw is None:
        return Timeouts()
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        total = _number(raw, where, source, minimum=0.001)
        return Timeouts(connect=min(10.0, total), first_byte=total, total=total)
    if not isinstance(raw, dict) or set(raw) - {"connect", "first_byte", "total"}:
        raise ConfigError(f"{source}: {where}: expected seconds or a mapping of connect, first_byte, total")
    d = Timeouts()
    return Timeouts(
        connect=_number(raw.get("connect", d.connect), f"{where}.connect", source, minimum=0.001),
        first_byte=_number(raw.get("first_byte", d.first_byte), f"{where}.first_byte", source, minimum=0.001),
        total=_number(raw.get("total", d.total), f"{where}.total", source, minimum=0.001),
    )


def _parse_backend(
    raw: Any, where: str, model: str, index: int, env: Mapping[str, str], source: str
) -> BackendConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping with provider and its settings")
    unknown = set(raw) - _BACKEND_KEYS
    if unknown:
        raise ConfigError(
            f"{source}: {where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_BACKEND_KEYS))}"
        )
    raw = _interpolate(raw, env, where, source)
    provider = raw.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"{source}: {where}.provider: {provider!r} is not a provider; use one of {', '.join(PROVIDERS)}"
        )
    auth = raw.get("auth", "api_key")
    if auth not in AUTH_METHODS:
        raise ConfigError(f"{source}: {where}.auth: {auth!r} is unknown; use api_key or entra_id")
    api_key = raw.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise ConfigError(f"{source}: {where}.api_key: expected a string (quote it)")
    api_version = str(raw.get("api_version") or DEFAULT_API_VERSION)
    endpoint = raw.get("endpoint")
    deployment = raw.get("deployment")
    base_url = raw.get("base_url")
    if provider == "azure":
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"{source}: {where}.endpoint: an azure backend needs endpoint: https://<resource>.openai.azure.com"
            )
        if not deployment:
            raise ConfigError(f"{source}: {where}.deployment: an azure backend needs the deployment name")
        if auth == "api_key" and not api_key:
            raise ConfigError(
                f"{source}: {where}.api_key: an azure backend with auth: api_key needs api_key "
                "(e.g. api_key: ${AZURE_OPENAI_API_KEY}) or auth: entra_id"
            )
        default_name = f"{model}@{_host(endpoint)}/{deployment}"
    elif provider == "openai":
        if base_url is None:
            base_url = "https://api.openai.com/v1"
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{source}: {where}.base_url: expected an http(s) URL such as https://api.openai.com/v1"
            )
        if auth == "entra_id":
            raise ConfigError(f"{source}: {where}.auth: entra_id is only for azure backends")
        default_name = f"{model}@{_host(base_url)}"
    else:
        default_name = f"{model}@mock"
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{source}: {where}.headers: expected a mapping of header names to values")
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and (
        not isinstance(max_parallel, int) or isinstance(max_parallel, bool) or max_parallel < 1
    ):
        raise ConfigError(f"{source}: {where}.max_parallel: expected a whole number >= 1")
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigError(f"{source}: {where}.priority: expected a whole number (lower is tried first)")
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
        weight=_number(raw.get("weight", 1), f"{where}.weight", source, minimum=0.0),
        timeout=_parse_timeout(raw.get("timeout"), f"{where}.timeout", source),
        max_parallel=max_parallel,
        delay_ms=_number(raw.get("delay_ms", 20), f"{where}.delay_ms", source),
        token_scope=str(raw["token_scope"]) if raw.get("token_scope") else None,
    )


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def _check_unique(models: list[ModelConfig], source: str) -> None:
    seen: dict[str, str] = {}
    for m in models:
        for n in (m.name, *m.aliases):
            if n in seen:
                raise ConfigError(
                    f"{source}: model name {n!r} is used by both {seen[n]!r} and {m.name!r}; names and aliases "
                    "must be unique"
                )
            seen[n] = m.name
