"""Deterministic synthetic math-agent preference pairs (RLHFlow style), standard library only.

Each row is ``{"chosen": [msgs], "rejected": [msgs]}``: an optional system message, a user
question, then assistant turns that reason and run ```python``` code, ``tool`` turns with the
```output```, and a final ``\\boxed{}`` answer. Both sides share the system + question (and
sometimes the first assistant/tool exchange, so the divergence point varies); the rejected
side then goes wrong (buggy code, a traceback it never fixes, a misread output) and boxes a
wrong answer. Used for the embedded sample dataset, tokenizer training and benchmarks.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from fractions import Fraction

# A few non-ASCII names and symbols so the sample data exercises unicode round-trips.
NAMES = ["Ava", "Liam", "José", "Zoë", "Mei", "Anaïs", "Søren", "Priya", "Kenji", "Olu", "Chloé", "Omar"]
ITEMS = ["pencil", "notebook", "apple", "ticket", "sticker", "mug", "candle", "crêpe"]
CURRENCY = ["$", "€", "£"]

SYSTEMS = [
    "You are a helpful math assistant. Solve problems step by step and use Python when it helps.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "You are a careful mathematician with a Python interpreter. Write code in ```python blocks; "
    "the results come back in ```output blocks.",
]
USER_SUFFIX = (
    "\nPlease integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)


def _problem(r: random.Random) -> dict:
    """One question with a correct and a buggy solution.

    Values are computed here rather than by executing the code: 200k rows must stay fast.
    Keys: q, plan/code/out/ans (correct), bad_plan/bad_code/bad_out/bad_ans (wrong).
    """
    kind = r.randrange(11)
    if kind == 0:  # change from a purchase
        name, item, cur = r.choice(NAMES), r.choice(ITEMS), r.choice(CURRENCY)
        a, b = r.randint(2, 15), r.randint(2, 9)
        c = r.choice([50, 100, 200]) if a * b < 50 else 200
        c = max(c, a * b + r.randint(1, 40))
        v, w = c - a * b, c - a
        return dict(
            q=f"{name} buys {b} {item}s at {cur}{a} each and pays with {cur}{c}. How much change does {name} get back?",
            plan=f"The total cost is {b} × {cur}{a}; the change is what is left of {cur}{c}.",
            code=f"price = {a}\ncount = {b}\npaid = {c}\nresult = paid - price * count\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan="The change is the amount paid minus the price.",
            bad_code=f"price = {a}\npaid = {c}\nresult = paid - price\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 1:  # sum of squares
        n = r.randint(5, 60)
        v, w = n * (n + 1) * (2 * n + 1) // 6, (n - 1) * n * (2 * n - 1) // 6
        q = r.choice(
            [f"What is the sum of the squares of the first {n} positive integers?", f"Compute 1² + 2² + … + {n}²."]
        )
        return dict(
            q=q,
            plan=f"We need the sum of k² for k from 1 to {n}, inclusive.",
            code=f"result = sum(k**2 for k in range(1, {n} + 1))\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan=f"Sum k² over range(1, {n}).",
            bad_code=f"result = sum(k**2 for k in range(1, {n}))\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 2:  # percentage discount; x*(100-p) is a multiple of 100 so the float prints exactly
        x, p = 20 * r.randint(2, 30), 5 * r.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16])
        v, w = x * (100 - p) // 100, x * p // 100
        return dict(
            q=f"A jacket costs ${x}. It is on sale for {p}% off. What is the sale price in dollars?",
            plan=f"The sale price is {100 - p}% of the original price.",
            code=f"price = {x}\ndiscount = {p}\nresult = price * (100 - discount) / 100\nprint(result)",
            out=f"{v}.0",
            ans=str(v),
            bad_plan=f"Take {p}% of the price.",
            bad_code=f"price = {x}\ndiscount = {p}\nresult = price * discount / 100\nprint(result)",
            bad_out=f"{w}.0",
            bad_ans=str(w),
        )
    if kind == 3:  # gcd / lcm, with the other one as the mistake
        g = r.randint(2, 12)
        a, b = g * r.randint(2, 15), g * r.randint(2, 15)
        while a == b:
            b += g
        fns = ["lcm", "gcd"] if r.random() < 0.5 else ["gcd", "lcm"]
        words = {"lcm": "least common multiple", "gcd": "greatest common divisor"}
        v, w = (getattr(math, f)(a, b) for f in fns)
        return dict(
            q=f"Find the {words[fns[0]]} of {a} and {b}.",
            plan=f"Python's math module has `{fns[0]}` for the {words[fns[0]]}.",
            code=f"import math\nresult = math.{fns[0]}({a}, {b})\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan=f"Use math.{fns[1]}.",
            bad_code=f"import math\nresult = math.{fns[1]}({a}, {b})\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 4:  # linear equation, the mistake flips the sign of b
        a, x0, b = r.randint(2, 12), r.randint(-20, 20), r.choice([-1, 1]) * r.randint(1, 40)
        c = a * x0 + b
        w = Fraction(c + b, a)
        sb = f"+ {b}" if b > 0 else f"- {-b}"
        bad_sb = f"- {b}" if b > 0 else f"+ {-b}"
        tex = (
            str(w.numerator)
            if w.denominator == 1
            else (("-" if w < 0 else "") + f"\\frac{{{abs(w.numerator)}}}{{{w.denominator}}}")
        )
        head = "from sympy import symbols, Eq, solve\nx = symbols('x')\n"
        return dict(
            q=f"Solve for $x$: ${a}x {sb} = {c}$.",
            plan="Solve the linear equation with sympy.",
            code=head + f"result = solve(Eq({a}*x {sb}, {c}), x)\nprint(result)",
            out=f"[{x0}]",
            ans=str(x0),
            bad_plan="Move the constant across and solve with sympy.",
            bad_code=head + f"result = solve(Eq({a}*x {bad_sb}, {c}), x)\nprint(result)",
            bad_out=f"[{w}]",
            bad_ans=tex,
        )
    if kind == 5:  # combinations vs permutations
        n, k = r.randint(5, 20), r.randint(2, 5)
        v, w = math.comb(n, k), math.perm(n, k)
        return dict(
            q=f"In how many ways can a committee of {k} people be chosen from a group of {n}?",
            plan=f"Order does not matter, so this is C({n}, {k}).",
            code=f"import math\nresult = math.comb({n}, {k})\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan=f"Count the arrangements of {k} out of {n}.",
            bad_code=f"import math\nresult = math.perm({n}, {k})\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 6:  # modular power; resample until the mistake gives a different value
        while True:
            a, e, m = r.randint(2, 30), r.randint(5, 200), r.randint(5, 50)
            v, w = pow(a, e, m), a * e % m
            if v != w:
                break
        return dict(
            q=f"What is the remainder when ${a}^{{{e}}}$ is divided by {m}?",
            plan="Use modular exponentiation with the three-argument `pow`.",
            code=f"result = pow({a}, {e}, {m})\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan=f"Multiply {a} by {e} and reduce modulo {m}.",
            bad_code=f"result = {a} * {e} % {m}\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 7:  # mean vs median
        while True:
            k = r.choice([5, 7])
            s = [r.randint(50, 100) for _ in range(k)]
            s[-1] += (-sum(s)) % k  # make the mean an integer
            v, w = sum(s) // k, sorted(s)[k // 2]
            if v != w:
                break
        return dict(
            q=f"The test scores of {k} students are {', '.join(map(str, s))}. What is the mean score?",
            plan="The mean is the sum of the scores divided by their count.",
            code=f"scores = {s}\nresult = sum(scores) / len(scores)\nprint(result)",
            out=f"{v}.0",
            ans=str(v),
            bad_plan="Take the middle score.",
            bad_code=f"scores = {s}\nresult = sorted(scores)[len(scores) // 2]\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 8:  # multiples below N (N itself is a multiple, so an off-by-one matters)
        d = r.randint(3, 13)
        big = d * r.randint(10, 80)
        v = d * (big // d - 1) * (big // d) // 2
        w = v + big
        return dict(
            q=f"What is the sum of all positive multiples of {d} that are less than {big}?",
            plan=f"Sum range({d}, {big}, {d}); the stop value is excluded, as the question asks.",
            code=f"result = sum(range({d}, {big}, {d}))\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan=f"Sum the multiples of {d} up to {big}.",
            bad_code=f"result = sum(range({d}, {big} + 1, {d}))\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    if kind == 9:  # perimeter vs area
        while True:
            length, wd = r.randint(3, 40), r.randint(2, 30)
            v, w = 2 * (length + wd), length * wd
            if v != w:
                break
        return dict(
            q=f"A rectangular garden is {length} m long and {wd} m wide. How many metres of fence go around it?",
            plan="The fence follows the perimeter, 2 × (length + width).",
            code=f"length, width = {length}, {wd}\nresult = 2 * (length + width)\nprint(result)",
            out=str(v),
            ans=str(v),
            bad_plan="Multiply length by width.",
            bad_code=f"length, width = {length}, {wd}\nresult = length * width\nprint(result)",
            bad_out=str(w),
            bad_ans=str(w),
        )
    # kind == 10: constant speed
    sp, t, t2 = r.randint(20, 120), r.randint(2, 6), r.randint(2, 9)
    d = sp * t
    v, w = sp * t2, d * t2
    return dict(
        q=f"A train travels {d} km in {t} hours. At the same speed, how far does it go in {t2} hours?",
        plan=f"The speed is {d} / {t} km/h; multiply it by {t2}.",
        code=f"speed = {d} // {t}\nresult = speed * {t2}\nprint(result)",
        out=str(v),
        ans=str(v),
        bad_plan=f"Scale the distance by {t2}.",
        bad_code=f"result = {d} * {t2}\nprint(result)",
        bad_out=str(w),
        bad_ans=str(w),
    )


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def _output(out: str) -> str:
    return f"```output\n{out}\n```"


def _error(r: random.Random, code: str) -> tuple[str, str]:
    """Break the code in a realistic way; return (broken code, traceback)."""
    lines = code.split("\n")
    n = len(lines)
    choice = r.randrange(3 if code.startswith("import math") else 2)
    if choice == 0:  # typo in the final print
        lines[-1] = "print(reslt)"
        tb = (
            f'Traceback (most recent call last):\n  File "<stdin>", line {n}, in <module>\n'
            "NameError: name 'reslt' is not defined. Did you mean: 'result'?"
        )
    elif choice == 1:  # unclosed parenthesis
        lines[-1] = "print(result"
        tb = f"  File \"<stdin>\", line {n}\n    print(result\n         ^\nSyntaxError: '(' was never closed"
    else:  # forgot the import
        lines = lines[1:]
        tb = (
            'Traceback (most recent call last):\n  File "<stdin>", line 1, in <module>\n'
            "NameError: name 'math' is not defined"
        )
    return "\n".join(lines), tb


def _final(r: random.Random, ans: str) -> str:
    return (
        r.choice(
            [
                "The answer is $\\boxed{%s}$.",
                "Therefore, the final answer is \\boxed{%s}.",
                "So the result is $\\boxed{%s}$.",
            ]
        )
        % ans
    )


def _steps(r: random.Random, p: dict, plan: list[str], prev: str | None = None) -> list[dict]:
    """Render a plan (a list of step kinds) into assistant/tool messages; ``prev`` is the step before it."""
    msgs: list[dict] = []
    for kind in plan:
        after_error = prev == "err"
        if kind == "direct":  # answer without code
            text, out = f"{p['plan']} Working it out by hand gives {p['ans']}.\n\n{_final(r, p['ans'])}", None
        elif kind == "wdirect":
            text, out = (
                f"{p['bad_plan']} Working it out by hand gives {p['bad_ans']}.\n\n{_final(r, p['bad_ans'])}",
                None,
            )
        elif kind == "err":
            code, out = _error(r, p["code"])
            text = f"{p['plan']} Let's compute it in Python.\n{_fenced(code)}"
        elif kind == "code":
            lead = "There is an error in the code. Let me fix it." if after_error else f"{p['plan']} Let's compute it."
            text, out = f"{lead}\n{_fenced(p['code'])}", p["out"]
        elif kind == "bad":
            lead = (
                "Let me fix that and try again."
                if after_error
                else f"Wait, let me reconsider. {p['bad_plan']}"
                if prev
                else p["bad_plan"]
            )
            text, out = f"{lead}\n{_fenced(p['bad_code'])}", p["bad_out"]
        elif kind in ("verify", "bverify"):
            val = p["out"] if kind == "verify" else p["bad_out"]
            text, out = f"Let me double-check the value.\n{_fenced(f'print(result == {val})')}", "True"
        elif kind == "final":
            seen = (
                f"The check passes, so the value is {p['ans']}." if prev == "verify" else f"The output is {p['out']}."
            )
            text, out = f"{seen}\n\n{_final(r, p['ans'])}", None
        elif kind == "wfinal":
            lead = (
                "The code failed, so I will estimate instead: it should be {b}."
                if after_error
                else "Reading the result, the value is {b}."
            )
            text, out = lead.format(b=p["bad_ans"]) + f"\n\n{_final(r, p['bad_ans'])}", None
        else:
            raise ValueError(kind)
        msgs.append({"role": "assistant", "content": text})
        if out is not None:
            msgs.append({"role": "tool", "content": _output(out)})
        prev = kind
    return msgs


# Plans for each side, 1 to 4 assistant turns. With a shared first exchange the tails follow it.
CHOSEN = [
    ["direct"],
    ["code", "final"],
    ["code", "verify", "final"],
    ["err", "code", "final"],
    ["err", "code", "verify", "final"],
]
REJECTED = [
    ["wdirect"],
    ["bad", "wfinal"],
    ["err", "wfinal"],
    ["code", "wfinal"],
    ["bad", "bverify", "wfinal"],
    ["err", "bad", "wfinal"],
    ["err", "bad", "bverify", "wfinal"],
]
SHARED_TAILS = {
    "code": ([["final"], ["verify", "final"]], [["wfinal"], ["bad", "wfinal"], ["bad", "bverify", "wfinal"]]),
    "err": (
        [["code", "final"], ["code", "verify", "final"]],
        [["wfinal"], ["bad", "wfinal"], ["bad", "bverify", "wfinal"]],
    ),
}


def make_pairs(n: int, seed: int = 0) -> Iterator[dict]:
    """Yield ``n`` preference pairs; the same (n, seed) always gives the same rows."""
    r = random.Random(seed)
    for _ in range(n):
        p = _problem(r)
        prompt = []
        if r.random() < 0.3:
            prompt.append({"role": "system", "content": r.choice(SYSTEMS)})
        prompt.append({"role": "user", "content": p["q"] + (USER_SUFFIX if r.random() < 0.5 else "")})
        if r.random() < 0.35:  # diverge after a shared assistant/tool exchange
            first = r.choice(["code", "err"])
            shared = _steps(r, p, [first])
            good_tails, bad_tails = SHARED_TAILS[first]
            chosen = prompt + shared + _steps(r, p, r.choice(good_tails), prev=first)
            rejected = prompt + shared + _steps(r, p, r.choice(bad_tails), prev=first)
        else:
            chosen = prompt + _steps(r, p, r.choice(CHOSEN))
            rejected = prompt + _steps(r, p, r.choice(REJECTED))
        assert chosen != rejected  # guaranteed: the final boxed answers differ
        yield {"chosen": chosen, "rejected": rejected}


def write_jsonl(path, n: int, seed: int = 0) -> int:
    """Write ``make_pairs(n, seed)`` to ``path`` as JSON lines (UTF-8, unicode kept); return rows written."""
    with open(path, "w", encoding="utf-8") as f:
        for row in make_pairs(n, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return n


# ── tool-use pairs (OpenAI / transformers chat format) ───────────────────────

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the program"}},
            "required": ["code"],
        },
    },
}
# The shapes agent data comes in; make_tool_pairs cycles through them.
TOOL_SHAPES = (
    "call-only turn",
    "content + call",
    "two calls in one turn",
    "two rounds",
    "reasoning",
    "second user turn",
    "text parts",
)


def make_tool_pairs(n: int, seed: int = 0) -> Iterator[dict]:
    """Yield ``n`` tool-use preference pairs with a row-level ``tools`` list and a ``shape`` key.

    Calls are ``{"type": "function", "id", "function": {"name": "python", "arguments": {"code"}}}``
    (arguments as an object, call-only turns with ``content: ""``), results are ``tool`` messages
    with ``tool_call_id`` and ``name``. Both sides share the question; the rejected side runs the
    buggy code and boxes the wrong answer.
    """
    r = random.Random(seed)
    for k in range(n):
        shape, p = TOOL_SHAPES[k % len(TOOL_SHAPES)], _problem(r)
        ids = iter(f"call{k:03d}{j:02d}" for j in range(10))  # 9 characters, as Mistral requires
        chosen = _tool_side(r, shape, p["code"], p["out"], p["ans"], ids)
        rejected = _tool_side(r, shape, p["bad_code"], p["bad_out"], p["bad_ans"], ids)
        question = {"role": "user", "content": [{"type": "text", "text": p["q"]}] if shape == "text parts" else p["q"]}
        yield {"shape": shape, "tools": [PYTHON_TOOL], "chosen": [question, *chosen], "rejected": [question, *rejected]}


def _tool_side(r: random.Random, shape: str, code: str, out: str, ans: str, ids: Iterator[str]) -> list[dict]:
    def calls(*codes: str, content: str = "", **extra) -> list[dict]:
        made = [(next(ids), c) for c in codes]
        turn = {
            "role": "assistant",
            "content": content,
            **extra,
            "tool_calls": [
                {"type": "function", "id": i, "function": {"name": "python", "arguments": {"code": c}}} for i, c in made
            ],
        }
        return [turn] + [
            {"role": "tool", "tool_call_id": i, "name": "python", "content": o} for (i, _), o in zip(made, outs(codes))
        ]

    def outs(codes) -> list[str]:
        return [out if c == code else "True" for c in codes]

    check = f"print({ans!r} == {ans!r})"
    answer = {"role": "assistant", "content": _final(r, ans)}
    if shape == "content + call":
        return calls(code, content="Let me compute it with Python.") + [answer]
    if shape == "two calls in one turn":
        return calls(code, check) + [answer]
    if shape == "two rounds":
        return calls(code) + calls(check) + [answer]
    if shape == "reasoning":
        return calls(code, reasoning_content="Write the program and run it.") + [
            dict(answer, reasoning_content=f"The tool printed {out}.")
        ]
    if shape == "second user turn":
        return calls(code) + [
            answer,
            {"role": "user", "content": "Explain in one sentence."},
            {"role": "assistant", "content": f"The program printed {out}."},
        ]
    return calls(code) + [answer]
