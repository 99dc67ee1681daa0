"""Access control: our own API keys, per-key models and IP ranges, rate limits and budgets."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from llm_backend.config import Settings

logger = logging.getLogger(__name__)


async def setup_access(settings: Settings, resources: Any, stack: contextlib.AsyncExitStack) -> None:
    if settings.auth == "none":
        logger.warning(
            "LLM_BACKEND_AUTH=none: every caller is accepted without an API key and no limits apply; "
            "never run this way where anyone else can reach the port"
        )
        return
