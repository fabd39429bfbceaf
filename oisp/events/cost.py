"""What an AI call cost: a dated price table, model matching, and cost from an OISP usage dict.

Pure: no I/O but reading a table file, so a test drives it with plain dicts.

The usage it prices is the event's ``data.usage``, which the provider decoders fill
in one convention whatever the wire said (OpenAI's, which the OpenTelemetry GenAI
conventions also use):

- ``prompt_tokens``: every input token, cache reads and cache writes included;
- ``cached_tokens``: the part of it read from a prompt cache;
- ``cache_write_tokens``: the part of it written to a prompt cache, of which
  ``cache_write_5m_tokens`` / ``cache_write_1h_tokens`` when the provider says which TTL;
- ``completion_tokens``: every output token, reasoning / thinking included;
- ``reasoning_tokens``: the part of it spent on reasoning.

How each provider's fields land there (the decoders do this; the hard cases):

- OpenAI Chat Completions and Responses: ``prompt_tokens`` / ``input_tokens`` already
  INCLUDE ``prompt_tokens_details.cached_tokens``; ``completion_tokens`` /
  ``output_tokens`` already include ``completion_tokens_details.reasoning_tokens``, which
  are billed at the output rate. A stream carries usage only in its last chunk, and only
  when the client asked (``stream_options.include_usage``); without it there is no
  usage and so no cost. OpenAI has no cache-write charge. DeepSeek's
  ``prompt_cache_hit_tokens`` is its name for cached tokens.
- Anthropic Messages: ``input_tokens`` EXCLUDES cache tokens, so prompt_tokens =
  input_tokens + cache_read_input_tokens + cache_creation_input_tokens; cache writes are
  split by TTL in ``cache_creation.ephemeral_5m_input_tokens`` / ``ephemeral_1h_input_tokens``
  (an unsplit remainder is billed at the 5-minute rate, the default TTL). Streamed, usage
  comes in ``message_start`` and again in ``message_delta``, whose counts are cumulative
  (totals so far, not increments): the last value of each field wins. Thinking tokens are
  inside output_tokens.
- Gemini: ``promptTokenCount`` INCLUDES ``cachedContentTokenCount``; ``thoughtsTokenCount``
  is NOT included in ``candidatesTokenCount`` and is billed as output, so
  completion_tokens = candidates + thoughts. Streamed, each chunk's ``usageMetadata`` is the
  running total and the last one wins. ``toolUsePromptTokenCount`` (tool results fed back
  by Google's own tools) is outside promptTokenCount and not counted.

The cost, in USD, with rates per million tokens:

    (prompt - cached - cache_write) × input + cached × cached_input
    + cache_write_5m × cache_write_5m + cache_write_1h × cache_write_1h
    + (completion - reasoning) × output + reasoning × (reasoning rate, else output)

A model whose price depends on prompt length (Gemini 2.5 Pro above 200k tokens, Claude
Sonnet 4 / 4.5 with the 1M context above 200k) has ``tiers``: when prompt_tokens exceeds a
tier's ``above``, that tier's rates replace the base ones for the whole call, output
included. Not priced: batch, flex and priority tiers, regional or data-residency
uplifts, audio/image token rates, cache storage per hour, and per-request tool fees
(web search); the figure is a list-price estimate of the tokens, flagged as one.

A model matches a table entry by its exact id, else by that id less a snapshot suffix
(``-20250929``, ``-2024-08-06``, ``-0613``, Gemini's ``-001``, ``-latest``), and never
otherwise: ``gpt-4o-mini`` does not fall back to ``gpt-4o``. An unknown model, a rate the
usage needs but the entry lacks, or a usage without token counts gives no cost rather
than a wrong one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

BUNDLED = Path(__file__).with_name("prices.json")
ENV_VAR = "OISP_PRICES"
RATE_FIELDS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output", "reasoning")
_SNAPSHOT = re.compile(r"^(?P<base>.+?)-(?:\d{8}|\d{4}-\d{2}-\d{2}|\d{4}|\d{3}|latest)$")
_PER_TOKEN = 1_000_000
_MAX_TOKENS = 10**12  # more than any one call: a count above it is hostile or broken, not priced


class PriceTableError(ValueError):
    """A price table that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Rates:
    """USD per million tokens; None where the table gives no price."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write_5m: float | None = None
    cache_write_1h: float | None = None
    reasoning: float | None = None


@dataclass(frozen=True)
class Price:
    base: Rates
    tiers: tuple[tuple[int, Rates], ...]  # (above this many prompt tokens, rates), ascending
    as_of: str
    source: str  # "bundled" or "user"

    def rates_for(self, prompt_tokens: int) -> Rates:
        rates = self.base
        for above, tier in self.tiers:
            if prompt_tokens > above:
                rates = tier
        return rates


class PriceTable:
    """Prices per spec provider id and model id, bundled ones overlaid by a user's."""

    def __init__(self, models: dict[str, dict[str, Price]], aliases: dict[str, str]) -> None:
        self._models = models
        self._aliases = aliases  # provider id → provider id whose prices it uses

    @classmethod
    def parse(cls, doc: Any, source: str, where: str) -> PriceTable:
        if not isinstance(doc, Mapping):
            raise PriceTableError(f"{where}: expected a JSON object with \"as_of\" and \"providers\"")
        unknown = set(doc) - {"as_of", "note", "providers"}
        if unknown:
            raise PriceTableError(f"{where}: unknown top-level field(s) {sorted(unknown)}")
        as_of = doc.get("as_of")
        try:
            date.fromisoformat(as_of if isinstance(as_of, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", as_of) else "")
        except ValueError:
            raise PriceTableError(f"{where}: \"as_of\" must be a date, YYYY-MM-DD (got {as_of!r})") from None
        providers = doc.get("providers")
        if not isinstance(providers, Mapping):
            raise PriceTableError(f"{where}: \"providers\" must be an object of provider id → entry")
        models: dict[str, dict[str, Price]] = {}
        aliases: dict[str, str] = {}
        for pid, entry in providers.items():
            at = f"{where}: providers.{pid}"
            if not isinstance(entry, Mapping):
                raise PriceTableError(f"{at}: expected an object")
            unknown = set(entry) - {"source", "same_as", "models"}
            if unknown:
                raise PriceTableError(f"{at}: unknown field(s) {sorted(unknown)}")
            if "same_as" in entry:
                if not isinstance(entry["same_as"], str) or "models" in entry:
                    raise PriceTableError(f"{at}: \"same_as\" is a provider id, and excludes \"models\"")
                aliases[pid] = entry["same_as"]
                continue
            if not isinstance(entry.get("models"), Mapping):
                raise PriceTableError(f"{at}: \"models\" must be an object of model id → rates")
            models[pid] = {mid: _price(rates, as_of, source, f"{at}.models.{mid}")  # type: ignore[arg-type]  # as_of: a date
                           for mid, rates in entry["models"].items()}
        return cls(models, aliases)

    @classmethod
    def load(cls, path: str | os.PathLike, source: str = "user") -> PriceTable:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise PriceTableError(f"price file {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise PriceTableError(f"price file {path}: not valid JSON ({e})") from None
        return cls.parse(doc, source, f"price file {path}")

    def overlaid(self, user: PriceTable) -> PriceTable:
        """This table with ``user``'s entries added, replacing any of the same provider and model."""
        models = {pid: dict(entries) for pid, entries in self._models.items()}
        for pid, entries in user._models.items():
            models.setdefault(pid, {}).update(entries)
        aliases = {k: v for k, v in self._aliases.items() if k not in user._models}
        aliases.update(user._aliases)
        return PriceTable(models, aliases)

    def lookup(self, provider: str | None, model: str | None) -> Price | None:
        if not provider or not model:
            return None
        entries = self._models.get(self._aliases.get(provider, provider))
        if not entries:
            return None
        price = entries.get(model)
        if price is None:
            m = _SNAPSHOT.match(model)
            price = entries.get(m.group("base")) if m else None
        return price

    def cost(self, provider: str | None, model: str | None, usage: Mapping[str, Any]) -> dict[str, Any] | None:
        """``usage.cost`` for this call, or None when it cannot be priced honestly."""
        price = self.lookup(provider, model)
        if price is None:
            return None
        usd = usage_cost(price, usage)
        if usd is None:
            return None
        return {"usd": usd, "estimate": True, "prices_as_of": price.as_of, "source": price.source}


def usage_cost(price: Price, usage: Mapping[str, Any]) -> float | None:
    n = {k: _count(usage.get(k)) for k in (
        "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
        "cache_write_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens")}
    if "prompt_tokens" not in usage and "completion_tokens" not in usage or max(n.values()) > _MAX_TOKENS:
        return None
    prompt, completion = n["prompt_tokens"], n["completion_tokens"]
    r = price.rates_for(prompt)
    write_1h = n["cache_write_1h_tokens"]
    write_5m = max(n["cache_write_tokens"], n["cache_write_5m_tokens"] + write_1h) - write_1h
    parts = [
        (max(0, prompt - n["cached_tokens"] - write_5m - write_1h), r.input),
        (n["cached_tokens"], r.cached_input),
        (write_5m, r.cache_write_5m),
        (write_1h, r.cache_write_1h),
    ]
    reasoning = min(n["reasoning_tokens"], completion)
    if r.reasoning is None:
        parts.append((completion, r.output))
    else:
        parts += [(completion - reasoning, r.output), (reasoning, r.reasoning)]
    total = 0.0
    for tokens, rate in parts:
        if tokens:
            if rate is None:
                return None
            total += tokens * rate
    return round(total / _PER_TOKEN, 10)


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _rates(doc: Any, where: str, allowed: set[str]) -> Rates:
    if not isinstance(doc, Mapping):
        raise PriceTableError(f"{where}: expected an object of rates (USD per million tokens)")
    unknown = set(doc) - allowed
    if unknown:
        raise PriceTableError(f"{where}: unknown field(s) {sorted(unknown)}; rates are {list(RATE_FIELDS)}")
    for name in ("input", "output"):
        if name not in doc:
            raise PriceTableError(f"{where}: \"{name}\" is required")
    values: dict[str, float] = {}
    for name in RATE_FIELDS:
        v = doc.get(name)
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v or v == float("inf"):
            raise PriceTableError(f"{where}.{name}: expected a number ≥ 0 (USD per million tokens), got {v!r}")
        values[name] = float(v)
    return Rates(**values)


def _price(doc: Any, as_of: str, source: str, where: str) -> Price:
    base = _rates(doc, where, set(RATE_FIELDS) | {"tiers", "note"})
    if not isinstance(doc.get("tiers", []), list):
        raise PriceTableError(f"{where}.tiers: expected a list of {{\"above\": prompt tokens, rates...}}")
    tiers = []
    for i, tier in enumerate(doc.get("tiers", [])):
        at = f"{where}.tiers[{i}]"
        above = tier.get("above") if isinstance(tier, Mapping) else None
        if not isinstance(above, int) or isinstance(above, bool) or above < 0:
            raise PriceTableError(f"{at}: \"above\" (prompt tokens) must be an integer ≥ 0")
        rates = {k: v for k, v in tier.items() if k != "above"}
        # A tier restates only what changes; the rest carries over from the base rates.
        merged = {k: doc[k] for k in RATE_FIELDS if k in doc} | rates
        tiers.append((above, _rates(merged, at, set(RATE_FIELDS))))
    return Price(base, tuple(sorted(tiers, key=lambda t: t[0])), as_of, source)


@lru_cache(maxsize=1)
def bundled() -> PriceTable:
    return PriceTable.load(BUNDLED, source="bundled")


def load_prices(path: str | None = None) -> PriceTable:
    """The bundled table overlaid by ``path``, else by the file ``$OISP_PRICES`` names.

    Raises :class:`PriceTableError` for a file that cannot be used, so a caller can say
    so at start instead of recording calls with wrong prices.
    """
    from_env = not path
    path = path or os.environ.get(ENV_VAR) or None
    if not path:
        return bundled()
    try:
        return bundled().overlaid(PriceTable.load(path))
    except PriceTableError as e:
        raise PriceTableError(f"{e} (named by ${ENV_VAR})" if from_env else str(e)) from None


def annotate(data: dict[str, Any], table: PriceTable) -> None:
    """Add ``usage.cost`` to an ai.response ``data`` when its call can be priced."""
    usage = data.get("usage")
    if not usage:
        return
    cost = table.cost((data.get("provider") or {}).get("id"), (data.get("model") or {}).get("id"), usage)
    if cost is not None:
        usage["cost"] = cost
