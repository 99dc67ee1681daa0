"""The console under gunicorn as `make run` serves it: sessions hold across workers, sign-out ends them in
every worker, and the demo (auth off, no admin key) opens the console to a browser on the same machine."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from llm_backend.db.migrate import upgrade
from tests.conftest import REPO, gunicorn_server
from tests.console.conftest import ADMIN_KEY, csrf_of

ROUNDS = 24  # requests per check: with two workers, both answer some of them (new connection each time)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    url = f"sqlite:///{tmp_path}/workers.db"
    upgrade(url)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "DATABASE_URL": url,
        "LLM_BACKEND_CONFIG": str(REPO / "config" / "demo.yaml"),
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "WEB_CONCURRENCY": "2",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def _statuses(url: str, cookie: str | None) -> tuple[set[int], set[str]]:
    codes, workers = set(), set()
    for _ in range(ROUNDS):
        cookies = {"llmb_console": cookie} if cookie else {}
        r = httpx.get(f"{url}/console/backends", cookies=cookies, timeout=30)  # a fresh connection each time
        codes.add(r.status_code)
        if r.status_code == 200:
            workers.add(r.text.split("as worker ", 1)[1].split(" ", 1)[0])
    return codes, workers


def test_sessions_hold_across_workers_and_sign_out_ends_them_everywhere(tmp_path: Path) -> None:
    env = _env(tmp_path, LLM_BACKEND_AUTH="keys", LLM_BACKEND_ADMIN_KEY=ADMIN_KEY)
    with (
        gunicorn_server(env, tmp_path / "gunicorn.log") as (_, url),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        page = http.get("/console/login")
        signed = http.post(
            "/console/login",
            data={"csrf_token": csrf_of(page.text), "admin_key": ADMIN_KEY},
            follow_redirects=False,
        )
        assert signed.status_code == 303, signed.text
        cookie = signed.cookies["llmb_console"]
        codes, workers = _statuses(url, cookie)
        assert codes == {200}
        assert (
            len(workers) >= 1
        )  # which worker answers is the kernel's choice; every one accepted the session
        out_page = http.get("/console/logout")
        out = http.post(
            "/console/logout", data={"csrf_token": csrf_of(out_page.text)}, follow_redirects=False
        )
        assert out.status_code == 303
        codes, _ = _statuses(url, cookie)
        assert codes == {303}


def test_the_demo_console_is_open_on_loopback(tmp_path: Path) -> None:
    env = _env(tmp_path, LLM_BACKEND_AUTH="none")
    with (
        gunicorn_server(env, tmp_path / "gunicorn.log") as (_, url),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        r = http.get("/console")
        assert r.status_code == 200 and "Open console" in r.text and "<svg" in r.text
        assert http.get("/console/backends").status_code == 200
        # the same server asked through a name that is not loopback: sign-in page, which says it is disabled
        r = http.get("/console", headers={"Host": "console.example"}, follow_redirects=True)
        assert "The console is disabled" in r.text
