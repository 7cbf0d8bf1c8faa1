"""What an LLM call costs: a price table per provider and model, and the arithmetic.

Keys are ``"provider/model"``; a key matches a model by prefix, the longest first, so
``"anthropic/claude-sonnet-4"`` prices ``claude-sonnet-4-5`` and any later dated name;
``"ollama/*"`` (any model of that provider) is the catch-all. mesh.toml's ``[prices]``
entries are laid over the defaults below (list prices in USD per million tokens, as the
vendors published them; local Ollama costs nothing). A call whose model no key matches
is recorded with its tokens and ``priced = false``: its cost is unknown, never guessed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Price(BaseModel):
    """USD per million tokens. Cached input defaults to a tenth of the input price (read)
    and 1.25 times it (written), as Anthropic bills; OpenAI bills cached reads at half."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_read_per_mtok: float | None = Field(None, ge=0)
    cache_write_per_mtok: float | None = Field(None, ge=0)


DEFAULT_PRICES: dict[str, Price] = {
    "anthropic/claude-opus-4": Price(input_per_mtok=15.0, output_per_mtok=75.0),
    "anthropic/claude-sonnet-4": Price(input_per_mtok=3.0, output_per_mtok=15.0),
    "anthropic/claude-3-7-sonnet": Price(input_per_mtok=3.0, output_per_mtok=15.0),
    "anthropic/claude-haiku-4": Price(input_per_mtok=1.0, output_per_mtok=5.0),
    "anthropic/claude-3-5-haiku": Price(input_per_mtok=0.8, output_per_mtok=4.0),
    "openai/gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.6, cache_read_per_mtok=0.075),
    "openai/gpt-4o": Price(input_per_mtok=2.5, output_per_mtok=10.0, cache_read_per_mtok=1.25),
    "openai/gpt-4.1-mini": Price(input_per_mtok=0.4, output_per_mtok=1.6, cache_read_per_mtok=0.1),
    "openai/gpt-4.1": Price(input_per_mtok=2.0, output_per_mtok=8.0, cache_read_per_mtok=0.5),
    "ollama/*": Price(input_per_mtok=0.0, output_per_mtok=0.0),
}


def price_for(prices: dict[str, Price], provider: str, model: str) -> Price | None:
    """The price of ``provider/model``: the longest key that is a prefix of it, else the
    provider's ``*`` entry, else None (unpriced)."""
    name = f"{provider}/{model}"
    best = max((k for k in prices if not k.endswith("/*") and name.startswith(k)), key=len, default=None)
    if best is not None:
        return prices[best]
    return prices.get(f"{provider}/*")


def cost_usd(price: Price, *, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0,
             cache_write_tokens: int = 0) -> float:
    """The cost of one call's tokens at ``price``.

    Returns: USD, rounded to a millionth of a cent (10 decimal places), so sums of many
    rows compare exactly with what the price table says."""
    read = price.cache_read_per_mtok if price.cache_read_per_mtok is not None else price.input_per_mtok * 0.1
    write = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok * 1.25
    usd = (input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok
           + cache_read_tokens * read + cache_write_tokens * write) / 1_000_000
    return round(usd, 10)


def merged(overrides: dict[str, Price]) -> dict[str, Price]:
    """The defaults with mesh.toml's ``[prices]`` laid over them."""
    return {**DEFAULT_PRICES, **overrides}
