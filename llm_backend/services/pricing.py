"""What a request cost: the prices of the model that answered, and exact arithmetic over its tokens."""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal

from llm_backend.config import ModelConfig, Prices

_MILLION = Decimal(1_000_000)

# What providers append to a model's name to say which snapshot answered: gpt-4o-2024-08-06,
# gpt-35-turbo-0125, claude-3-5-sonnet-20241022, mistral-large-2411, some-model-v2, some-model@001,
# gpt-4o-mini-2024-07-18-ft (no: a fine-tune is another model, it must be configured by its own name).
_VERSION_SUFFIX = re.compile(r"[-@:.](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{6}|\d{4}|\d{3}|v\d+(?:\.\d+)*)")


def _decimal(price: float) -> Decimal:
    """A price as the decimal the models file wrote (2.5, not 2.5000000000000000277...): the shortest
    repr of a float reads back as the same float, and for prices written with up to 15 digits it is the
    very digits that were written."""
    return Decimal(repr(price))


def cost_decimal(
    prices: Prices, *, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = 0
) -> Decimal:
    """The exact cost of one request. `prompt_tokens` includes `cached_tokens` (as OpenAI counts them):
    cached tokens are billed at `cached_input` and not again at `input`; `completion_tokens` includes the
    reasoning tokens, billed at `output` like the rest of the answer."""
    prompt = max(int(prompt_tokens or 0), 0)
    cached = min(max(int(cached_tokens or 0), 0), prompt)
    completion = max(int(completion_tokens or 0), 0)
    total = (
        (prompt - cached) * _decimal(prices.input)
        + cached * _decimal(prices.cached_input)
        + completion * _decimal(prices.output)
    )
    return total / _MILLION


def cost_of(
    prices: Prices, *, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = 0
) -> float:
    """The cost of one request in the prices' currency: computed exactly in decimal, then the nearest float
    (what the request log's float column holds); see cost_decimal for how tokens are billed."""
    return float(
        cost_decimal(
            prices,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
        )
    )


def round_cost(value: float | None) -> float | None:
    """A sum of costs for display and JSON, without the float noise of adding many rows (12 decimals:
    far below a single token at any price sold today, far above the noise of a float sum)."""
    return None if value is None else round(float(value), 12) + 0.0  # + 0.0: never -0.0


class PriceBook:
    """The configured models by every name that may appear as the model that answered."""

    def __init__(self, models: Iterable[ModelConfig]) -> None:
        self._by_name: dict[str, ModelConfig] = {}
        self._by_lower: dict[str, ModelConfig] = {}
        for m in models:
            if m.wildcard:
                continue
            for n in (m.name, *m.aliases):
                self._by_name.setdefault(n, m)
                self._by_lower.setdefault(n.lower(), m)

    def model_named(self, answered: str | None) -> ModelConfig | None:
        """The configured model a provider's answer names: by name or alias, then (case aside) by a name
        plus a snapshot suffix (`gpt-4o-2024-08-06` is `gpt-4o`; the longest configured name wins, so
        `gpt-4o-mini-2024-07-18` is `gpt-4o-mini`, not `gpt-4o`)."""
        if not answered:
            return None
        found = self._by_name.get(answered) or self._by_lower.get(answered.lower())
        if found is not None:
            return found
        lowered = answered.lower()
        best: tuple[int, ModelConfig] | None = None
        for n, m in self._by_lower.items():
            longer = best is None or len(n) > best[0]
            if longer and lowered.startswith(n) and _is_version_suffix(lowered[len(n) :]):
                best = (len(n), m)
        return best[1] if best else None

    def prices_for(self, *, answered: str | None, requested: ModelConfig | str | None) -> Prices | None:
        """The prices of the model that answered (the response's `model`, as Azure's model router names
        the model it chose), else those of the model the request was routed to; None when neither has
        prices configured."""
        found = self.model_named(answered)
        if found is not None and found.prices is not None:
            return found.prices
        if isinstance(requested, str):
            requested = self.model_named(requested)
        return requested.prices if requested is not None else None

    def cost(
        self,
        *,
        answered: str | None,
        requested: ModelConfig | str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None,
    ) -> float | None:
        """The request's cost at the prices of the model that answered; None when no prices apply."""
        prices = self.prices_for(answered=answered, requested=requested)
        if prices is None:
            return None
        return cost_of(
            prices,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
        )


def _is_version_suffix(rest: str) -> bool:
    """Whether what follows a configured name is one or more snapshot markers (`-2024-08-06`,
    `-0613`, `-v2`, `-2024-08-06-v1`): a date or version, never another word (`-mini`, `-turbo`)."""
    pos = 0
    while pos < len(rest):
        m = _VERSION_SUFFIX.match(rest, pos)
        if m is None:
            return False
        pos = m.end()
    return pos > 0
