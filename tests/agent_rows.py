"""Deterministic agent preference pairs in the OpenAI chat format (standard library only).

    from agent_rows import agent_rows, qa_rows
    rows = agent_rows(60, seed=0)      # 60 pairs {"chosen", "rejected", "tools"?}
    rows = qa_rows(20, seed=0)         # one-turn question/answer pairs

Why this exists: the held-out check runs `mtdpo preprocess` on real chat templates with agent
rows, and our own check (tests/oracle.py, scripts/template_table.py) needs rows of the same
kinds. Every row is a pair whose sides share the prompt (an optional system message and the
first user message) and part at an assistant turn; a few rows also share a first call and its
result and part later. The shapes cycle so that any 60 consecutive rows hold every shape:

- call-only assistant turns (content "" or null) with one or several calls per turn,
- tool results (`role: tool`, `tool_call_id`, `name`), then a final answer,
- reasoning (`reasoning_content`) on some assistant turns,
- a follow-up user question after a final answer (several trained assistant turns),
- arguments as dicts and as JSON strings, content with non-ASCII text,
- rows without `tools` (plain multi-turn chat),
- reasoning written into the content as `<think>\n...\n</think>\n\n` (QwQ / R1 style, the only
  form those templates render),
- a reasoning model's raw output as the content, `...\n</think>\n\n` + answer, without the
  `<think>\n` its generation prompt opened (what a server returns without a reasoning parser).

Tool-call ids are 9 alphanumeric characters (Mistral's templates refuse other lengths).
"""

from __future__ import annotations

import json
import random

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web and return the top results.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "What to search for"},
            "top_k": {"type": "integer", "description": "How many results"}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "The expression"}},
            "required": ["expression"]}}},
]  # fmt: skip

CITIES = ["Paris", "Zürich", "São Paulo", "東京", "Kraków", "Reykjavík", "Cairo", "Montréal"]
SYSTEMS = ["You are a helpful assistant with tools.", "Réponds brièvement.", "You are an agent. Use tools when needed."]
SHAPES = ["call_then_answer", "two_calls_one_turn", "reasoning", "follow_up", "content_and_call",
          "shared_first_call", "plain_chat", "three_calls_unicode", "inline_think", "raw_think"]  # fmt: skip


def agent_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """`n` agent pairs, the same for the same (n, seed)."""
    rng = random.Random(seed)
    return [_agent_row(SHAPES[i % len(SHAPES)], i, rng) for i in range(n)]


def qa_rows(n: int = 20, seed: int = 0) -> list[dict]:
    """`n` one-turn question/answer pairs (every third with a system message)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        prompt = ([_msg("system", rng.choice(SYSTEMS))] if i % 3 == 0 else []) + [_msg("user", f"What is {a} + {b}?")]
        rows.append({"chosen": [*prompt, _msg("assistant", f"{a} + {b} = {a + b}.")],
                     "rejected": [*prompt, _msg("assistant", f"It is {a + b + rng.randint(1, 9)}.")]})  # fmt: skip
    return rows


# ── one row ───────────────────────────────────────────────────────────────────


class _Ids:
    """Tool-call ids unique within a row: 9 alphanumeric characters."""

    def __init__(self, row: int):
        self.row, self.n = row, 0

    def __call__(self) -> str:
        self.n += 1
        return f"c{self.row:05d}{self.n:03d}"


def _agent_row(shape: str, i: int, rng: random.Random) -> dict:
    ids = _Ids(i)
    city, other = rng.sample(CITIES, 2)
    cycle = i // len(SHAPES)  # so that each shape meets each variant across cycles
    system = [_msg("system", rng.choice(SYSTEMS))] if (i + cycle) % 2 == 0 else []
    as_string = (i + cycle) % 3 == 1  # arguments as a JSON string on a third of the rows
    null_content = cycle % 2 == 0  # call-only turns with content null (else "")
    weather = _weather_call(city, ids(), as_string)
    if shape == "plain_chat":
        q = _msg("user", f"Tell me one fact about {city}.")
        good = [_msg("assistant", f"{city} has a long history."), _msg("user", "And another?"),
                _msg("assistant", f"{city} is visited by many travellers — ¡muchos!")]  # fmt: skip
        bad = [_msg("assistant", "I don't know."), _msg("user", "And another?"), _msg("assistant", "No.")]
        return {"chosen": [*system, q, *good], "rejected": [*system, q, *bad]}
    if shape == "inline_think":
        q = _msg("user", f"Is {city} a capital city? Answer yes or no.")
        good = [_msg("assistant", f"<think>\nI recall the capitals I know; {city} ...\n</think>\n\nLet me answer: it depends."),
                _msg("user", "Be brief."), _msg("assistant", "<think>\nShort answer.\n</think>\n\nMaybe.")]  # fmt: skip
        bad = [
            _msg("assistant", "<think>\nNo idea.\n</think>\n\nYes!"),
            _msg("user", "Be brief."),
            _msg("assistant", "Yes."),
        ]
        return {"chosen": [*system, q, *good], "rejected": [*system, q, *bad]}
    q = _msg("user", f"What's the weather in {city}?")
    if shape == "call_then_answer":
        chosen = _exchange([weather], ["18°C, light rain"], null_content) + [
            _msg("assistant", f"It is 18°C with light rain in {city}.")
        ]
        rejected = [_msg("assistant", f"It is sunny in {city}.")]
    elif shape == "two_calls_one_turn":
        calls = [weather, _weather_call(other, ids(), not as_string)]
        q = _msg("user", f"Compare the weather in {city} and {other}.")
        chosen = _exchange(calls, ["18°C", "25°C"], null_content) + [
            _msg("assistant", f"{other} is warmer than {city}.")
        ]
        rejected = _exchange([_weather_call(city, ids(), as_string)], ["18°C"], null_content) + [
            _msg("assistant", "Both are the same.")
        ]
    elif shape == "reasoning":
        call = _assistant_call(
            [weather], null_content, reasoning="The user wants the weather; I should call get_weather."
        )
        chosen = [call, _tool(weather, "21°C, clear"),
                  _msg("assistant", f"Clear skies, 21°C in {city}.", reasoning="The tool says 21°C and clear.")]  # fmt: skip
        rejected = [_msg("assistant", "I cannot check the weather.", reasoning="I will not use tools.")]
    elif shape == "follow_up":
        chosen = _exchange([weather], ["12°C"], null_content) + [_msg("assistant", f"It is 12°C in {city}."),
                                                                 _msg("user", "Should I take a coat?")]  # fmt: skip
        search = _call("search", {"query": f"coat advice 12°C {city}", "top_k": 2}, ids(), as_string)
        chosen += _exchange([search], ["Yes: a light coat at 12°C."], null_content) + [
            _msg("assistant", "Yes, take a light coat.")
        ]
        rejected = [
            _msg("assistant", "It is warm."),
            _msg("user", "Should I take a coat?"),
            _msg("assistant", "No need."),
        ]
    elif shape == "content_and_call":
        calc = _call("calculator", {"expression": "17 * 23"}, ids(), as_string)
        q = _msg("user", "What is 17 × 23?")
        chosen = [
            _assistant_call([calc], None, content="Let me compute that."),
            _tool(calc, "391"),
            _msg("assistant", "17 × 23 = 391."),
        ]
        rejected = [_msg("assistant", "17 × 23 = 401.")]
    elif shape == "raw_think":
        chosen = [
            _assistant_call([weather], None, content="I should look the weather up.\n</think>\n\n"),
            _tool(weather, "14°C"),
            _msg("assistant", f"The tool says 14°C.\n</think>\n\nIt is 14°C in {city}."),
        ]
        rejected = [_msg("assistant", f"I can guess.\n</think>\n\nIt is hot in {city}.")]
    elif shape == "shared_first_call":
        shared = _exchange([weather], ["9°C, windy"], null_content)
        search = _call("search", {"query": f"wind {city}"}, ids(), as_string)
        chosen = [
            *shared,
            *_exchange([search], ["Gusts of 60 km/h."], null_content),
            _msg("assistant", "9°C with strong gusts."),
        ]
        rejected = [*shared, _msg("assistant", "It is calm.")]
    else:  # three_calls_unicode
        cities = [city, other, rng.choice([c for c in CITIES if c not in (city, other)])]
        calls = [_weather_call(c, ids(), k % 2 == 0) for k, c in enumerate(cities)]
        q = _msg("user", f"Météo à {', '.join(cities)} ? 🌦️")
        chosen = _exchange(calls, ["5°C ❄️", "30°C ☀️", "15°C ☁️"], null_content) + [
            _msg("assistant", f"Le plus chaud : {cities[1]} (30°C ☀️).")
        ]
        rejected = [_msg("assistant", "Je ne sais pas 🤷.")]
    row = {"chosen": [*system, q, *chosen], "rejected": [*system, q, *rejected], "tools": TOOLS}
    assert row["chosen"] != row["rejected"]
    return row


# ── messages ──────────────────────────────────────────────────────────────────


def _msg(role: str, content: str, reasoning: str | None = None) -> dict:
    m = {"role": role, "content": content}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


def _call(name: str, arguments: dict, call_id: str, as_string: bool) -> dict:
    args = json.dumps(arguments, ensure_ascii=False) if as_string else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _weather_call(city: str, call_id: str, as_string: bool) -> dict:
    return _call("get_weather", {"city": city, "unit": "celsius"}, call_id, as_string)


def _assistant_call(
    calls: list[dict], null_content: bool | None, content: str | None = None, reasoning: str | None = None
) -> dict:
    m = {
        "role": "assistant",
        "content": content if content is not None else (None if null_content else ""),
        "tool_calls": calls,
    }
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


def _tool(call: dict, result: str) -> dict:
    return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": result}


def _exchange(calls: list[dict], results: list[str], null_content: bool) -> list[dict]:
    """A call-only assistant turn and one tool message per call."""
    return [_assistant_call(calls, null_content), *(_tool(c, r) for c, r in zip(calls, results, strict=True))]
