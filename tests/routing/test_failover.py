"""Failover between regions: 429 cool-downs, 5xx, timeouts, refused connections; what never fails over."""

from __future__ import annotations

import logging
import time

import orjson
import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer

from llm_backend.config import Timeouts
from llm_backend.db import migrate
from llm_backend.db.models import RequestLog
from llm_backend.db.session import make_engine, session_scope
from tests.conftest import assert_openai_error, azure_chat_completion, closed_port_url
from tests.routing.conftest import (
    answer,
    backends,
    chat,
    content,
    cut_stream,
    fail,
    hits,
    model,
    region,
    stall,
    stream_ok,
)

# -- 429 and Retry-After --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "cooldown"),
    [
        ({"Retry-After": "2"}, 2.0),
        # Azure sends both; the millisecond header is the precise one and wins
        ({"retry-after-ms": "1200", "Retry-After": "30"}, 1.2),
        ({"retry-after-ms": "1200"}, 1.2),
    ],
    ids=["retry-after", "retry-after-ms-wins", "retry-after-ms"],
)
def test_429_cools_down_that_region_only(
    open_client, router_clock, east: HTTPServer, west: HTTPServer, headers: dict[str, str], cooldown: float
) -> None:
    fail(east, 429, {"error": {"code": "429", "message": "Requests have exceeded the rate limit."}}, headers)
    answer(west, "west")
    c = open_client(model(region(east, "eastus", priority=0), region(west, "westus", priority=1)))

    assert content(chat(c)) == "west"
    assert (hits(east), hits(west)) == (1, 1)
    assert backends(c)["eastus"]["cooldown_remaining_s"] == cooldown

    # while it cools down, east is skipped: it receives nothing (until just before the end)
    router_clock.advance(cooldown - 0.05)
    assert content(chat(c)) == "west"
    assert (hits(east), hits(west)) == (1, 2)
    state = backends(c)
    assert state["eastus"]["state"] == "closed", "a 429 is quota, not sickness"
    assert 0 < state["eastus"]["cooldown_remaining_s"] <= cooldown
    assert state["westus"]["cooldown_remaining_s"] == 0

    # after the cool-down east is used again
    answer(east, "east")
    router_clock.advance(0.1)
    assert content(chat(c)) == "east"
    assert (hits(east), hits(west)) == (2, 2)
    assert backends(c)["eastus"]["cooldown_remaining_s"] == 0


def test_429_without_retry_after_still_fails_over(open_client, east: HTTPServer, west: HTTPServer) -> None:
    fail(east, 429)
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    assert content(chat(c)) == "west"
    assert content(chat(c)) == "west"
    assert hits(east) == 1, "a 429 without Retry-After still cools the region down (default)"
    assert backends(c)["eastus"]["cooldown_remaining_s"] > 1


# -- 5xx, timeouts, refused connections ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_fails_over(open_client, east: HTTPServer, west: HTTPServer, status: int) -> None:
    fail(east, status)
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    assert content(chat(c)) == "west"
    assert (hits(east), hits(west)) == (1, 1)
    state = backends(c)["eastus"]
    assert state["failures"] == 1 and state["consecutive_failures"] == 1
    assert str(status) in state["last_error"]
    assert backends(c)["westus"]["successes"] == 1


def test_timeout_fails_over_within_the_configured_bound(
    open_client, laggard: HTTPServer, west: HTTPServer
) -> None:
    east = laggard
    arrived = stall(east, orjson.dumps(azure_chat_completion("too late")), "application/json")
    answer(west, "west")
    timeouts = Timeouts(connect=1, first_byte=0.5, total=1)
    c = open_client(model(region(east, "eastus", timeout=timeouts), region(west, "westus", priority=1)))
    t0 = time.monotonic()
    r = chat(c)
    elapsed = time.monotonic() - t0
    # east holds the request for a minute: west's answer, now, means the timeout ended the first attempt
    assert content(r) == "west"
    assert elapsed >= timeouts.first_byte, f"gave up on east after {elapsed:.2f}s, before {timeouts}"
    assert len(arrived) == 1 and hits(west) == 1
    assert "Timeout" in backends(c)["eastus"]["last_error"]


def test_timeout_on_the_only_backend_is_a_504(open_client, laggard: HTTPServer) -> None:
    east = laggard
    stall(east, orjson.dumps(azure_chat_completion("too late")), "application/json")
    c = open_client(model(region(east, "eastus", timeout=Timeouts(connect=1, first_byte=0.5, total=1))))
    t0 = time.monotonic()
    r = chat(c)
    assert time.monotonic() - t0 >= 0.5
    assert_openai_error(r, 504, code="upstream_timeout")  # while east still holds the request


def test_connection_refused_fails_over(open_client, west: HTTPServer) -> None:
    answer(west, "west")
    c = open_client(model(region(closed_port_url(), "eastus"), region(west, "westus", priority=1)))
    t0 = time.monotonic()
    assert content(chat(c)) == "west"
    assert time.monotonic() - t0 < 3.0
    state = backends(c)["eastus"]
    assert state["failures"] == 1
    assert "Unreachable" in state["last_error"]


def test_retries_bound_how_many_regions_are_tried(
    open_client, east: HTTPServer, west: HTTPServer, central: HTTPServer
) -> None:
    fail(east, 500)
    fail(west, 500)
    answer(central, "central")
    regions = (
        region(east, "eastus", priority=0),
        region(west, "westus", priority=1),
        region(central, "centralus", priority=2),
    )
    c = open_client(model(*regions, retries=1))
    assert_openai_error(chat(c), 502)
    assert (hits(east), hits(west), hits(central)) == (1, 1, 0)

    c2 = open_client(model(*regions, retries=2))
    assert content(chat(c2)) == "central"
    assert (hits(east), hits(west), hits(central)) == (2, 2, 1)


# -- what never fails over ----------------------------------------------------------------------------------

BAD_REQUEST = {
    "error": {
        "message": "Invalid value for 'logit_bias': token 99999999 is out of range.",
        "type": "invalid_request_error",
        "param": "logit_bias",
        "code": "invalid_value",
    }
}
CONTENT_FILTER = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
        "policy. Please modify your prompt and retry.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": False, "severity": "safe"},
                "jailbreak": {"filtered": False, "detected": False},
                "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"},
                "violence": {"filtered": True, "severity": "medium"},
            },
        },
    }
}
DEPLOYMENT_NOT_FOUND = {
    "error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist.",
    }
}


def test_400_comes_back_without_failover(open_client, east: HTTPServer, west: HTTPServer) -> None:
    fail(east, 400, BAD_REQUEST)
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    r = chat(c, logit_bias={"99999999": 1})
    error = assert_openai_error(r, 400, code="invalid_value", param="logit_bias")
    assert error["message"] == BAD_REQUEST["error"]["message"]
    assert (hits(east), hits(west)) == (1, 0)
    state = backends(c)["eastus"]
    assert state["state"] == "closed" and state["failures"] == 0, "the caller's error is not the backend's"


def test_content_filter_comes_back_without_failover(open_client, east: HTTPServer, west: HTTPServer) -> None:
    fail(east, 400, CONTENT_FILTER)
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    r = chat(c)
    error = assert_openai_error(r, 400, code="content_filter")
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True
    assert (hits(east), hits(west)) == (1, 0)
    assert backends(c)["eastus"]["failures"] == 0


def test_404_does_not_fail_over(open_client, east: HTTPServer, west: HTTPServer) -> None:
    fail(east, 404, DEPLOYMENT_NOT_FOUND)
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    assert_openai_error(chat(c), 404, code="DeploymentNotFound")
    assert (hits(east), hits(west)) == (1, 0)


# -- configuration of failover -----------------------------------------------------------------------------


def test_fail_over_on_429_only_returns_a_500_as_is(open_client, east: HTTPServer, west: HTTPServer) -> None:
    fail(east, 500)
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1), fail_over_on=("429",)))
    assert_openai_error(chat(c), 502, code="upstream_error")
    assert (hits(east), hits(west)) == (1, 0)

    # ... while a 429 still fails over
    fail(east, 429, headers={"Retry-After": "1"})
    assert content(chat(c)) == "west"
    assert (hits(east), hits(west)) == (2, 1)


def test_fail_over_on_without_connect_returns_the_refusal(open_client, west: HTTPServer) -> None:
    answer(west, "west")
    cfg = model(
        region(closed_port_url(), "eastus"), region(west, "westus", priority=1), fail_over_on=("5xx", "429")
    )
    c = open_client(cfg)
    assert_openai_error(chat(c), 502, code="upstream_unreachable")
    assert hits(west) == 0


def test_retries_zero_means_no_failover(open_client, east: HTTPServer, west: HTTPServer) -> None:
    answer(west, "west")
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1), retries=0))
    fail(east, 500)
    assert_openai_error(chat(c), 502)
    fail(east, 429, headers={"Retry-After": "7"})
    r = chat(c)
    assert_openai_error(r, 429, code="rate_limit_exceeded", type_="rate_limit_error")
    assert r.headers["retry-after"] == "7"
    assert (hits(east), hits(west)) == (2, 0)


# -- logs and records ----------------------------------------------------------------------------------------


def test_every_failed_attempt_is_logged_naming_its_backend(
    open_client, east: HTTPServer, west: HTTPServer, central: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    fail(east, 503)
    fail(west, 429, headers={"Retry-After": "5"})
    answer(central, "central")
    c = open_client(
        model(
            region(east, "eastus", priority=0),
            region(west, "westus", priority=1),
            region(central, "centralus", priority=2),
            retries=2,
        )
    )
    caplog.set_level(logging.WARNING, logger="llm_backend")
    assert content(chat(c)) == "central"
    failures = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "llm_backend.services.proxy"
    ]
    messages = [r.getMessage() for r in failures]
    assert len(failures) == 2, messages
    assert "eastus" in messages[0] and "503" in messages[0]
    assert "westus" in messages[1]
    assert not any("centralus" in m for m in messages)
    assert [getattr(r, "backend", None) for r in failures] == ["eastus", "westus"]
    assert [getattr(r, "attempt", None) for r in failures] == [1, 2]


def _rows(url: str) -> list[RequestLog]:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            rows = list(session.scalars(sa.select(RequestLog).order_by(RequestLog.created_at)))
            session.expunge_all()
            return rows
    finally:
        engine.dispose()


def test_record_names_the_backend_that_answered_and_the_attempts(
    settings, tmp_path, east: HTTPServer, west: HTTPServer
) -> None:
    from llm_backend.app import create_app

    url = f"sqlite:///{tmp_path}/rec.db"
    migrate.upgrade(url)
    fail(east, 500)
    answer(west, "west")
    cfg = model(region(east, "eastus"), region(west, "westus", priority=1))
    app = create_app(settings(cfg, recording=True, database_url=url))
    with app.test_client() as c:
        assert content(chat(c)) == "west"
        fail(west, 502)
        assert_openai_error(chat(c), 502)
    rows = _rows(url)
    assert len(rows) == 2
    ok, failed = rows
    assert (ok.backend, ok.attempts, ok.status_code, ok.outcome) == ("westus", 2, 200, "ok")
    assert ok.provider == "azure" and ok.deployment == "d" and ok.model == "gpt-4o"
    assert (failed.backend, failed.attempts, failed.status_code) == ("westus", 2, 502)


def test_stream_records_name_the_answering_backend(
    settings, tmp_path, east: HTTPServer, west: HTTPServer
) -> None:
    from llm_backend.app import create_app

    url = f"sqlite:///{tmp_path}/rec.db"
    migrate.upgrade(url)
    fail(east, 503)
    stream_ok(west)
    cfg = model(region(east, "eastus"), region(west, "westus", priority=1))
    with create_app(settings(cfg, recording=True, database_url=url)).test_client() as c:
        assert chat(c, stream=True).status_code == 200
        cut_stream(east)  # east is still closed (1 failure of 5): tried first again
        assert chat(c, stream=True).status_code == 200
    first, second = _rows(url)
    assert (first.stream, first.backend, first.attempts, first.outcome) == (True, "westus", 2, "ok")
    assert (second.stream, second.backend, second.attempts, second.outcome) == (True, "eastus", 1, "error")
    assert hits(west) == 1


def test_record_of_a_request_no_backend_could_take_has_zero_attempts(
    settings, tmp_path, east: HTTPServer
) -> None:
    from llm_backend.app import create_app

    url = f"sqlite:///{tmp_path}/rec.db"
    migrate.upgrade(url)
    fail(east, 429, headers={"Retry-After": "30"})
    app = create_app(settings(model(region(east, "eastus")), recording=True, database_url=url))
    with app.test_client() as c:
        assert chat(c).status_code == 429
        assert chat(c).status_code == 503
    rows = _rows(url)
    assert [r.status_code for r in rows] == [429, 503]
    assert rows[0].attempts == 1
    assert rows[1].attempts == 0
