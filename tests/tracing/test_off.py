"""Tracing off: nothing of OpenTelemetry is loaded; and which environments turn it on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llm_backend.tracing import DEFAULT_CONTENT_MAX, tracing_config
from tests.conftest import REPO

SERVE_AND_CHECK = textwrap.dedent(
    """
    import sys
    from llm_backend.app import create_app
    from llm_backend.config import BackendConfig, ModelConfig, Settings

    model = ModelConfig(name="mock", backends=(BackendConfig(provider="mock", name="m"),))
    app = create_app(Settings(models=(model,), auth="none", recording=False, data_dir=sys.argv[1]))
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    with app.test_client() as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        r = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
        assert r.status_code == 200 and "[DONE]" in r.text
        assert client.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code in (400, 404)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    print("LOADED", loaded)
    assert not loaded, loaded
    """
)


@pytest.mark.parametrize(
    "otel_env",
    [
        {},
        # set, but switched off the standard ways
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"},
        # settings that only matter once tracing is on
        {"OTEL_SERVICE_NAME": "x", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"},
    ],
    ids=["unset", "sdk-disabled", "exporter-none", "no-endpoint"],
)
def test_opentelemetry_is_never_imported_when_tracing_is_off(
    otel_env: dict[str, str], tmp_path: object
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(otel_env)
    result = subprocess.run(
        [sys.executable, "-c", SERVE_AND_CHECK, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "LOADED []" in result.stdout


def test_tracing_config_reads_the_standard_variables() -> None:
    assert tracing_config({}) is None
    assert tracing_config({"OTEL_SERVICE_NAME": "x"}) is None
    on = tracing_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert on is not None and on.exporters == ("otlp",) and on.capture_content is False
    assert on.content_max_chars == DEFAULT_CONTENT_MAX
    assert tracing_config({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) is not None
    assert tracing_config({"OTEL_TRACES_EXPORTER": "console"}).exporters == ("console",)  # type: ignore[union-attr]
    both = tracing_config({"OTEL_TRACES_EXPORTER": "otlp, console"})
    assert both is not None and both.exporters == ("otlp", "console")
    # the standard ways to switch it off win over an endpoint
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing_config({**endpoint, "OTEL_SDK_DISABLED": "TRUE"}) is None
    assert tracing_config({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_config({**endpoint, "OTEL_SDK_DISABLED": "false"}) is not None
    # an exporter we do not ship is named in a warning; the endpoint still means OTLP
    assert tracing_config({**endpoint, "OTEL_TRACES_EXPORTER": "zipkin"}).exporters == ("otlp",)  # type: ignore[union-attr]
    for value, expected in (
        ("true", True),
        ("True", True),
        ("span_only", True),
        ("false", False),
        ("", False),
    ):
        config = tracing_config({**endpoint, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": value})
        assert config is not None and config.capture_content is expected, value
    limited = tracing_config({**endpoint, "LLM_BACKEND_OTEL_CONTENT_MAX_CHARS": "5000"})
    assert limited is not None and limited.content_max_chars == 5000
    bad = tracing_config({**endpoint, "LLM_BACKEND_OTEL_CONTENT_MAX_CHARS": "lots"})
    assert bad is not None and bad.content_max_chars == DEFAULT_CONTENT_MAX
