"""Cost estimates: hand-computed figures for the hard cases (from the providers' documented
usage fields, decoded by the real decoders), model matching, unknown models, the user's
price file, the record status line, and the schema of ``usage.cost``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import load_cases, pair, run_case, validate

from oisp.cli.sensor import Status
from oisp.decode import Direction
from oisp.events import FlowRecorder, load_schema
from oisp.events.cost import PriceTable, PriceTableError, bundled, load_prices

CASES = {c.name: c for c in load_cases()}
AS_OF = json.loads((Path(__file__).parent.parent / "oisp" / "events" / "prices.json").read_text())["as_of"]
M = 1_000_000  # prices are per million tokens


def decoded(name: str, prices: PriceTable | None = None) -> dict:
    case = CASES[name]
    if prices is None:
        events, _ = run_case(case)
    else:  # the same wire bytes, through a recorder given this table
        from provider_cases import context, http1_request, http1_response

        rec = FlowRecorder(context(case), prices=prices)
        events = rec.feed(Direction.REQUEST, http1_request(case), 1000.1)
        events += rec.feed(Direction.RESPONSE, http1_response(case), 1000.2)
        events += rec.close(1000.3)
    validate(events)
    return pair(events)[1]


# --- the hard cases, figures by hand -------------------------------------------------------

def test_anthropic_stream_cache_reads_and_5m_1h_writes() -> None:
    # message_start: input_tokens 12 (cache tokens excluded), cache_read 4096, cache_creation 2048
    # of which ephemeral_5m 512 and ephemeral_1h 1536; output_tokens 1, then 87 in message_delta
    # (cumulative: 87 in all, not 88). Sonnet 4.5: input 3, cache read 0.30, 5m write 3.75,
    # 1h write 6, output 15.
    resp = decoded("anthropic_cache_stream")
    u = resp["usage"]
    assert (u["prompt_tokens"], u["cached_tokens"], u["cache_write_tokens"]) == (12 + 4096 + 2048, 4096, 2048)
    assert (u["cache_write_5m_tokens"], u["cache_write_1h_tokens"], u["completion_tokens"]) == (512, 1536, 87)
    expected = (12 * 3 + 4096 * 0.30 + 512 * 3.75 + 1536 * 6 + 87 * 15) / M
    assert u["cost"] == {"usd": pytest.approx(expected), "estimate": True, "prices_as_of": AS_OF, "source": "bundled"}
    assert u["cost"]["usd"] == pytest.approx(0.0137058)
    # What a tool that reads input_tokens as the whole prompt, or bills writes as input, gets:
    assert u["cost"]["usd"] != pytest.approx((12 * 3 + 87 * 15) / M)
    assert u["cost"]["usd"] != pytest.approx(((12 + 2048) * 3 + 4096 * 0.30 + 87 * 15) / M)


def test_anthropic_stream_message_delta_output_is_cumulative() -> None:
    # anthropic_stream: output_tokens 1 in message_start, 15 in message_delta: 15 in all.
    # input 25 + cache read 10; Sonnet 4: 25 x 3 + 10 x 0.30 + 15 x 15.
    u = decoded("anthropic_stream")["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (35, 15, 50)
    assert u["cost"]["usd"] == pytest.approx((25 * 3 + 10 * 0.30 + 15 * 15) / M)


def test_openai_stream_usage_chunk_cached_and_reasoning() -> None:
    # The include_usage chunk: prompt_tokens 1500 INCLUDES cached_tokens 1280; completion_tokens
    # 700 INCLUDES reasoning_tokens 640, billed at the output rate. o4-mini: 1.10 / 0.275 / 4.40.
    u = decoded("openai_reasoning_stream")["usage"]
    assert (u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"], u["reasoning_tokens"]) == (1500, 1280, 700, 640)
    assert u["cost"]["usd"] == pytest.approx(((1500 - 1280) * 1.10 + 1280 * 0.275 + 700 * 4.40) / M)
    assert u["cost"]["usd"] == pytest.approx(0.003674)
    # Not the figures of billing cached tokens twice or reasoning on top of completion:
    assert u["cost"]["usd"] != pytest.approx((1500 * 1.10 + 1280 * 0.275 + 700 * 4.40) / M)
    assert u["cost"]["usd"] != pytest.approx(((1500 - 1280) * 1.10 + 1280 * 0.275 + (700 + 640) * 4.40) / M)


def test_openai_stream_without_include_usage_has_no_cost() -> None:
    # openai_chat_tools_stream was sent without stream_options.include_usage: no usage, no cost.
    assert "usage" not in decoded("openai_chat_tools_stream")


def test_openai_responses_stream_cached_and_reasoning() -> None:
    # response.completed usage: input_tokens 2000 includes cached 1536; output_tokens 900
    # includes reasoning 768. gpt-5 (response model gpt-5-2025-08-07): 1.25 / 0.125 / 10.
    u = decoded("openai_responses_reasoning_stream")["usage"]
    assert u["cost"]["usd"] == pytest.approx(((2000 - 1536) * 1.25 + 1536 * 0.125 + 900 * 10) / M)


def test_gemini_stream_thinking_cache_and_long_context_tier() -> None:
    # Last usageMetadata: promptTokenCount 250000 (includes cachedContentTokenCount 200000),
    # candidatesTokenCount 300, thoughtsTokenCount 1200 (NOT inside candidates, billed as output).
    # 250000 > 200k: Gemini 2.5 Pro's long-prompt rates for the whole call: 2.50 / 0.25 / 15.
    u = decoded("gemini_thinking_stream")["usage"]
    assert (u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"], u["reasoning_tokens"]) == (250000, 200000, 1500, 1200)
    assert u["cost"]["usd"] == pytest.approx(((250000 - 200000) * 2.50 + 200000 * 0.25 + (300 + 1200) * 15) / M)
    # Short-prompt rates, or thoughts left out, would give:
    assert u["cost"]["usd"] != pytest.approx((50000 * 1.25 + 200000 * 0.125 + 1500 * 10) / M)
    assert u["cost"]["usd"] != pytest.approx((50000 * 2.50 + 200000 * 0.25 + 300 * 15) / M)


def test_gemini_prompt_tier_boundary() -> None:
    usage = {"prompt_tokens": 200_000, "completion_tokens": 1000}
    at = bundled().cost("google_gemini", "gemini-2.5-pro", usage)["usd"]
    above = bundled().cost("google_gemini", "gemini-2.5-pro", {**usage, "prompt_tokens": 200_001})["usd"]
    assert at == pytest.approx((200_000 * 1.25 + 1000 * 10) / M)
    assert above == pytest.approx((200_001 * 2.50 + 1000 * 15) / M)


def test_anthropic_long_context_tier_counts_cache_tokens() -> None:
    # Sonnet 4.5 with the 1M window: 1000 uncached + 150000 read + 60000 written = 211000 > 200k,
    # so every token is at the long-context rates: 6 / 0.60 / 7.50 (5m) / 22.50.
    usage = {"prompt_tokens": 211_000, "cached_tokens": 150_000, "cache_write_tokens": 60_000, "completion_tokens": 2000}
    got = bundled().cost("anthropic", "claude-sonnet-4-5-20250929", usage)["usd"]
    assert got == pytest.approx((1000 * 6 + 150_000 * 0.60 + 60_000 * 7.50 + 2000 * 22.50) / M)
    small = bundled().cost("anthropic", "claude-sonnet-4-5", {**usage, "prompt_tokens": 151_000, "cache_write_tokens": 0})["usd"]
    assert small == pytest.approx((1000 * 3 + 150_000 * 0.30 + 2000 * 15) / M)


def test_openai_long_context_tier_above_272k() -> None:
    # gpt-5.4 above 272K input tokens: 2x input (cached too) and 1.5x output for the whole call.
    usage = {"prompt_tokens": 300_000, "cached_tokens": 100_000, "completion_tokens": 4000, "reasoning_tokens": 3000}
    got = bundled().cost("openai", "gpt-5.4-2026-03-05", usage)["usd"]
    assert got == pytest.approx((200_000 * 5.0 + 100_000 * 0.50 + 4000 * 22.50) / M)
    short = bundled().cost("openai", "gpt-5.4", {**usage, "prompt_tokens": 272_000})["usd"]
    assert short == pytest.approx((172_000 * 2.50 + 100_000 * 0.25 + 4000 * 15) / M)


def test_haiku_5_5_prompt_tier_above_100k() -> None:
    # 90k uncached + 20k written (1h) = 110k > 100k: 0.50 input, 1.00 1h write, 2.50 output.
    usage = {"prompt_tokens": 110_000, "cache_write_tokens": 20_000, "cache_write_1h_tokens": 20_000, "completion_tokens": 500}
    got = bundled().cost("anthropic", "claude-haiku-5-5", usage)["usd"]
    assert got == pytest.approx((90_000 * 0.50 + 20_000 * 1.00 + 500 * 2.50) / M)


def test_every_priced_fixture_validates_and_says_bundled() -> None:
    priced = 0
    for case in CASES.values():
        resp = decoded(case.name)
        cost = resp.get("usage", {}).get("cost")
        if cost:
            priced += 1
            assert cost["estimate"] is True
            assert cost["source"] == "bundled"
            assert cost["prices_as_of"] == AS_OF
    assert priced >= 10


# --- model matching ---------------------------------------------------------------------------

@pytest.mark.parametrize("provider,model,entry", [
    ("openai", "gpt-4o", "gpt-4o"),
    ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
    ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("openai", "gpt-4-0613", "gpt-4"),
    ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("anthropic", "claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("anthropic", "claude-opus-4-20250514", "claude-opus-4"),
    ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("anthropic", "claude-opus-5-5", "claude-opus-5-5"),
    ("anthropic", "claude-opus-5-20260724", "claude-opus-5"),
    ("google_gemini", "gemini-2.0-flash-001", "gemini-2.0-flash"),
    ("azure_openai", "gpt-4o-2024-11-20", "gpt-4o"),
])
def test_snapshot_ids_match_their_model(provider: str, model: str, entry: str) -> None:
    table = bundled()
    target = "openai" if provider == "azure_openai" else provider
    assert table.lookup(provider, model) is table.lookup(target, entry) is not None


def test_exact_id_wins_over_its_snapshot_prefix() -> None:
    # The first gpt-4o snapshot kept its own, higher price: 5 / 15, not gpt-4o's 2.50 / 10.
    cost = bundled().cost("openai", "gpt-4o-2024-05-13", {"prompt_tokens": 1000, "completion_tokens": 100})
    assert cost["usd"] == pytest.approx((1000 * 5 + 100 * 15) / M)


def test_no_loose_match_to_a_shorter_model() -> None:
    only_4o = PriceTable.parse({"as_of": "2026-01-01",
                                "providers": {"openai": {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}}}, "user", "t")
    for model in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "gpt-4o-audio-preview", "gpt-4o-2024-08-06-ft", "chatgpt-4o-latest",
                  "gpt-4"):
        assert only_4o.lookup("openai", model) is None, model
    assert only_4o.lookup("openai", "gpt-4o-2024-08-06") is not None
    only_opus_5 = PriceTable.parse({"as_of": "2026-01-01",
                                    "providers": {"anthropic": {"models": {"claude-opus-5": {"input": 5, "output": 25}}}}},
                                   "user", "t")
    assert only_opus_5.lookup("anthropic", "claude-opus-5-5") is None
    assert only_opus_5.lookup("anthropic", "claude-opus-5-5-20261001") is None
    assert only_opus_5.lookup("anthropic", "claude-opus-5-20260724") is not None


@pytest.mark.parametrize("provider,model", [
    ("openai", "gpt-9-turbo"), ("openai", None), ("ollama", "llama3.2"), ("anthropic", "claude-opus-4-9"),
    ("anthropic", "claude-opus"), (None, "gpt-4o"), ("openai", "o1-pro"),
])
def test_unknown_model_has_no_cost(provider, model) -> None:
    assert bundled().cost(provider, model, {"prompt_tokens": 10, "completion_tokens": 10}) is None


def test_unknown_model_event_has_no_cost_field() -> None:
    resp = decoded("ollama_chat_ndjson")
    assert resp["usage"]["prompt_tokens"] == 11
    assert "cost" not in resp["usage"]


def test_missing_rate_gives_no_cost_not_a_wrong_one() -> None:
    # gpt-4o-2024-05-13 has no cached-input price; cache writes have none at OpenAI.
    assert bundled().cost("openai", "gpt-4o-2024-05-13",
                          {"prompt_tokens": 2000, "cached_tokens": 1024, "completion_tokens": 5}) is None
    assert bundled().cost("openai", "gpt-4o", {"prompt_tokens": 2000, "cache_write_tokens": 1024, "completion_tokens": 5}) is None
    assert bundled().cost("openai", "gpt-4o", {"total_tokens": 5}) is None


def test_absurd_counts_give_no_cost_and_no_crash() -> None:
    # JSON integers are unbounded: 10**400 tokens must not raise OverflowError in the recorder.
    for usage in ({"prompt_tokens": 10**400, "completion_tokens": 1}, {"prompt_tokens": 5, "completion_tokens": 10**13},
                  {"prompt_tokens": -5, "completion_tokens": True}):
        cost = bundled().cost("openai", "gpt-4o", usage)
        assert cost is None or cost["usd"] == 0


def test_unsplit_cache_write_is_billed_at_the_5m_rate() -> None:
    usage = {"prompt_tokens": 1100, "cache_write_tokens": 1000, "completion_tokens": 0}
    got = bundled().cost("anthropic", "claude-haiku-4-5-20251001", usage)["usd"]
    assert got == pytest.approx((100 * 1.0 + 1000 * 1.25) / M)


def test_reasoning_priced_apart_when_the_table_says_so() -> None:
    table = PriceTable.parse({"as_of": "2026-01-01", "providers": {"google_gemini": {"models": {
        "gemini-2.5-flash-preview-04-17": {"input": 0.15, "output": 0.6, "reasoning": 3.5}}}}}, "user", "t")
    got = table.cost("google_gemini", "gemini-2.5-flash-preview-04-17",
                     {"prompt_tokens": 100, "completion_tokens": 1100, "reasoning_tokens": 1000})
    assert got["usd"] == pytest.approx((100 * 0.15 + 100 * 0.6 + 1000 * 3.5) / M)


# --- the user's price file --------------------------------------------------------------------

USER = {
    "as_of": "2026-11-30",
    "providers": {
        "openai": {"source": "our contract", "models": {"gpt-4o": {"input": 2.0, "cached_input": 1.0, "output": 8.0}}},
        "ollama": {"models": {"llama3.2": {"input": 0, "output": 0}}},
    },
}


def test_user_file_overrides_and_adds(tmp_path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(USER))
    table = load_prices(str(path))
    gpt4o = table.cost("openai", "gpt-4o-2024-08-06", {"prompt_tokens": 1000, "completion_tokens": 100})
    assert gpt4o == {"usd": pytest.approx((1000 * 2.0 + 100 * 8.0) / M), "estimate": True, "prices_as_of": "2026-11-30",
                     "source": "user"}
    assert table.cost("ollama", "llama3.2", {"prompt_tokens": 11, "completion_tokens": 3})["usd"] == 0
    mini = table.cost("openai", "gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 100})  # untouched: bundled
    assert mini["source"] == "bundled"
    assert mini["prices_as_of"] == AS_OF
    assert bundled().cost("openai", "gpt-4o", {"prompt_tokens": 1000, "completion_tokens": 100})["source"] == "bundled"


def test_user_prices_reach_the_event(tmp_path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(USER))
    resp = decoded("openai_chat_json", prices=load_prices(str(path)))  # gpt-4o-2024-08-06: 12 in, 2 out
    assert resp["usage"]["cost"] == {"usd": pytest.approx((12 * 2.0 + 2 * 8.0) / M), "estimate": True,
                                     "prices_as_of": "2026-11-30", "source": "user"}


def test_env_var_names_the_user_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(USER))
    monkeypatch.setenv("OISP_PRICES", str(path))
    assert load_prices().cost("ollama", "llama3.2", {"prompt_tokens": 1, "completion_tokens": 1})["source"] == "user"
    monkeypatch.setenv("OISP_PRICES", str(tmp_path / "missing.json"))
    with pytest.raises(PriceTableError, match=r"missing\.json.*OISP_PRICES"):
        load_prices()


@pytest.mark.parametrize("doc,message", [
    ("{not json", "not valid JSON"),
    ('{"providers": {}}', "as_of"),
    ('{"as_of": "30/11/2026", "providers": {}}', "as_of"),
    ('{"as_of": "2026-W48-1", "providers": {}}', "as_of"),
    ('{"as_of": "2026-02-30", "providers": {}}', "as_of"),
    ('{"as_of": "2026-11-30"}', "providers"),
    ('{"as_of": "2026-11-30", "providers": {"openai": {"models": {"gpt-4o": {"input": -1, "output": 8}}}}}', r"gpt-4o\.input"),
    ('{"as_of": "2026-11-30", "providers": {"openai": {"models": {"gpt-4o": {"input": 1}}}}}', r"\"output\" is required"),
    ('{"as_of": "2026-11-30", "providers": {"openai": {"models": {"gpt-4o": {"input": 1, "output": 2, "cache_read": 0.5}}}}}',
     "cache_read"),
    ('{"as_of": "2026-11-30", "providers": {"openai": {"models": {"gpt-4o": {"input": "2.5", "output": 2}}}}}', "number"),
    ('{"as_of": "2026-11-30", "providers": {"openai": {"models": {"gpt-4o": {"input": 1, "output": 2, "tiers": [{"input": '
     '2}]}}}}}', "above"),
    ('{"as_of": "2026-11-30", "provider": {}}', "provider"),
])
def test_bad_user_file_is_a_clear_error(tmp_path, doc: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(PriceTableError, match=message) as err:
        load_prices(str(path))
    assert str(path) in str(err.value)


def test_record_refuses_a_bad_price_file_at_start(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"as_of": "2026-11-30", "providers": {"openai": {"models": {"gpt-4o": {"input": 1}}}}}')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-m", "oisp", "record", "--prices", str(path), "--duration", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert str(path) in out.stderr
    assert "gpt-4o" in out.stderr
    assert "output" in out.stderr


def test_bundled_table_is_dated_and_sourced() -> None:
    doc = json.loads((Path(__file__).parent.parent / "oisp" / "events" / "prices.json").read_text())
    spec = json.loads((Path(__file__).parent.parent / "oisp" / "spec" / "ai_endpoints.json").read_text())
    ids = {p["id"] for p in spec["providers"]}
    assert set(doc["providers"]) <= ids  # keyed by the spec's provider ids
    assert all(p.get("source") for p in doc["providers"].values())
    bundled()  # parses


# --- the status line and the schema ------------------------------------------------------------

def test_status_sums_known_costs_and_flags_unpriced() -> None:
    status = Status()
    for usage in ({"total_tokens": 10, "cost": {"usd": 0.0125, "estimate": True, "prices_as_of": AS_OF, "source": "bundled"}},
                  {"total_tokens": 5, "cost": {"usd": 0.0002, "estimate": True, "prices_as_of": AS_OF, "source": "user"}}):
        status.see({"event_type": "ai.response", "data": {"usage": usage}})
    status.see({"event_type": "ai.response", "data": {}})  # an error without usage: nothing spent
    assert (status.usd, status.cost, status.tokens) == (pytest.approx(0.0127), "~$0.0127", 15)
    status.see({"event_type": "ai.response", "data": {"usage": {"total_tokens": 7}}})  # a model without a price
    assert status.cost == "~$0.0127+?"
    small = Status()
    small.see({"event_type": "ai.response", "data": {"usage": {"cost": {"usd": 0.00000585}}}})
    assert small.cost == "~$0.000006"  # sub-cent totals keep their digits


def test_schema_constrains_the_cost_object() -> None:
    resp_event = next(e for e in run_case(CASES["openai_chat_json"])[0] if e["event_type"] == "ai.response")
    schema = load_schema("ai.response")
    jsonschema.validate(resp_event, schema)
    for bad in ({"usd": -1}, {"estimate": False}, {"source": "guess"}, {"prices_as_of": "yesterday"}, {"extra": 1}):
        broken = json.loads(json.dumps(resp_event))
        broken["data"]["usage"]["cost"].update(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


# --- through the real `oisp record` path -------------------------------------------------------

from tests.record_lab import read_events, run_client, stop_sensor  # noqa: E402


@pytest.mark.privileged
def test_record_prices_real_sdk_calls_with_the_users_file(record_lab) -> None:
    """`oisp record --prices FILE` in a namespace; the openai and anthropic SDKs call the fake
    provider through it: gpt-4o-mini at the user's price, claude-sonnet-4-5 at the bundled one."""
    prices = record_lab["tmp"] / "prices.json"
    prices.write_text(json.dumps({"as_of": "2026-11-30",
                                  "providers": {"openai": {"models": {"gpt-4o-mini": {"input": 1.0, "output": 2.0}}}}}))
    assert stop_sensor(record_lab) == 0
    record_lab["sensor"] = record_lab["start_sensor"]("--prices", str(prices))
    for name, base in (("openai_sync", "https://api.openai.com"), ("anthropic", "https://api.anthropic.com")):
        done = run_client(record_lab, name, base)
        assert done.returncode == 0, done.stderr[-2000:]
    assert stop_sensor(record_lab) == 0
    summary = record_lab["sensor"].stderr.read()
    costs = [e["data"]["usage"]["cost"] for e in read_events(record_lab) if e["event_type"] == "ai.response"]
    # The fake provider's usage: openai 11 prompt + 7 completion; anthropic 13 input + 5 output.
    assert costs == [
        {"usd": pytest.approx((11 * 1.0 + 7 * 2.0) / M), "estimate": True, "prices_as_of": "2026-11-30", "source": "user"},
        {"usd": pytest.approx((13 * 3 + 5 * 15) / M), "estimate": True, "prices_as_of": AS_OF, "source": "bundled"},
    ]
    assert "cost ~$0.000139 (estimate)" in summary  # 0.000025 + 0.000114
