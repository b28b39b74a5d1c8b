"""A tokenizer's chat template, rendered exactly as `apply_chat_template(tokenize=False)` renders
it: transformers' own compiled, sandboxed Jinja template and variables, without its per-call
overhead (every row renders several prefixes of itself). Also what the masking rule needs to
know about the template: which tokens end an assistant turn (from the family registry where the
template alone does not say, else read off the template with a probe conversation).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from mtdpo import compat
from mtdpo.families import detect_family
from mtdpo.preprocess.limits import RenderTimeout
from mtdpo.preprocess.rows import RowError

# A render of the conversation so far: (messages, add_generation_prompt) -> text.
Render = Callable[[list, bool], str]


# Probe contents: private-use characters no template adds or strips.
PROBE_USER, PROBE_ASSISTANT, PROBE_NEXT = "\ue010x\ue011", "\ue010y\ue011", "\ue010z\ue011"
PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "", "parameters": {"type": "object"}}}


class ChatTemplate:
    def __init__(self, tokenizer):
        self.markers = added_tokens(tokenizer)
        self._template = compile_template(tokenizer.chat_template)
        # Every call's variables over the template's globals, as Template.render merges them, but
        # with the globals (a ChainMap, which dict() walks in Python) flattened once, not per call.
        self._globals = dict(self._template.globals)
        self._variables = {**self._globals, **tokenizer.special_tokens_map}
        family = detect_family(tokenizer.chat_template)
        # A template that never names a tool (Gemma's) renders no call, result or schema.
        self.has_tool_support = "tool" in tokenizer.chat_template.lower()
        self.ends_with_next_role = bool(family and family.ends_with_next_role)
        self.end_markers = family.end_markers if family and family.end_markers else self._probe_end_markers()
        self.untokenized_end = "" if self.end_markers or self.ends_with_next_role else self._untokenized_end()
        self._next_role_tokens: dict[str, str] = {}
        specials = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token]
        self.control_tokens = ControlTokens([*filter(None, specials), *self.end_markers, *self._turn_openers()])

    def render(self, messages: list[dict], generation_prompt: bool = False, tools=None, template_kwargs=None) -> str:
        """`Template.render(messages=..., tools=..., documents=None, add_generation_prompt=...,
        **special tokens, **template_kwargs)`: the same text and errors."""
        variables = {**self._variables, **template_kwargs} if template_kwargs else dict(self._variables)
        variables.update(messages=messages, tools=tools, documents=None, add_generation_prompt=generation_prompt)
        try:
            return compat.render_template(self._template, variables, self._globals)
        except RenderTimeout:
            raise  # the row's time is up (limits.py): not an error of the template's own
        except Exception as err:  # the template's own error (raise_exception, bad roles …) is the reason
            raise RowError(f"chat template error: {err}") from None

    def renderer(self, tools=None, template_kwargs=None) -> Render:
        """`render` bound to one row's tools and template arguments."""
        return lambda messages, generation_prompt=False: self.render(
            messages, generation_prompt, tools, template_kwargs
        )

    def _probe(self) -> str | None:
        """A user → assistant conversation rendered, with a tool schema for templates that need one."""
        probe = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ASSISTANT}]
        for tools in (None, [PROBE_TOOL]):
            try:
                text = self.render(probe, tools=tools)
            except RowError:
                continue
            if PROBE_USER in text and PROBE_ASSISTANT in text:
                return text
        return None

    def _turn_openers(self) -> list[str]:
        """The tokens that open a turn in the probe (after its start and after each end of turn):
        written inside a message, they would start a turn of their own."""
        text = self._probe()
        if text is None:
            return []
        openers, cuts = [], [0] + [k + len(m) for m in self.end_markers for k in _find_all(text, m)]
        for cut in cuts:
            openers += self.tokens_at(text, cut)[:1]
        return openers

    def _probe_end_markers(self) -> tuple[str, ...]:
        """The token that ends an assistant turn, read off a user → assistant probe: the token that
        ends the user's turn (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|END_OF_TURN_TOKEN|>`)
        when the assistant's turn has it too, else the first token after the assistant's text
        (Mistral's `</s>`, DeepSeek's end of sentence). Only an added token that closes the probe's
        turn qualifies: none (a template that cannot render the probe) rejects every row, saying so."""
        text = self._probe()
        if text is None:
            return ()
        after_user = self.tokens_at(text, text.index(PROBE_USER) + len(PROBE_USER))
        after_assistant = self.tokens_at(text, text.rindex(PROBE_ASSISTANT) + len(PROBE_ASSISTANT))
        if after_user and after_user[0] in after_assistant:
            return after_user[:1]
        return after_assistant[:1]

    def _untokenized_end(self) -> str:
        """What the template writes after an assistant's text when no added token ends the turn
        (Qwen's `<|im_end|>` with another model's tokenizer): the end would be ordinary tokens, so
        rows are rejected saying so. "" when the template writes nothing there."""
        text = self._probe()
        if text is None:
            return ""
        rest = text[text.rindex(PROBE_ASSISTANT) + len(PROBE_ASSISTANT) :]
        return rest.split()[0] if rest.split() else ""

    def tokens_at(self, text: str, position: int) -> list[str]:
        """The added tokens written one after another from `position` (whitespace before the
        first skipped; none if other text comes first)."""
        position += len(text[position:]) - len(text[position:].lstrip())
        run = []
        while marker := next((m for m in self.markers if text.startswith(m, position)), None):
            run.append(marker)
            position += len(marker)
        return run

    def next_role_token(self, role: str) -> str:
        """For a family whose model stops by writing the next message's role token (GLM): the
        token the template writes right after an assistant turn that a `role` message follows."""
        if role not in self._next_role_tokens:
            following = {"role": role, "content": PROBE_NEXT}
            if role == "tool":
                following["tool_call_id"] = "0"
            probe = [
                {"role": "user", "content": PROBE_USER},
                {"role": "assistant", "content": PROBE_ASSISTANT},
                following,
            ]
            try:
                text = self.render(probe)
                run = self.tokens_at(text, text.rindex(PROBE_ASSISTANT) + len(PROBE_ASSISTANT))
            except (RowError, ValueError):
                run = []
            self._next_role_tokens[role] = run[0] if run else ""
        return self._next_role_tokens[role]


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled as transformers compiles it, with memoized attribute checks. Cached,
    so the up-front syntax check (preprocess/tokenizer.py) and ChatTemplate compile it once."""
    template = compat.compile_chat_template(source)
    memoize_attribute_checks(template.environment)
    return template


def memoize_attribute_checks(environment) -> None:
    """Jinja's immutable sandbox asks `is_safe_attribute(obj, attr, value)` at every attribute
    access in a template (a third of a render). Its answer depends only on type(obj) and attr
    (isinstance tests and name lists), so it is asked once per (type, attr): the same
    decisions, the same errors, at a dict lookup's cost."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if type(environment).is_safe_attribute is not ImmutableSandboxedEnvironment.is_safe_attribute:
        return  # a sandbox whose rule may depend on the value: ask every time
    ask, known = environment.is_safe_attribute, {}

    def is_safe_attribute(obj, attr: str, value) -> bool:
        key = (type(obj), attr)
        if key not in known:
            known[key] = ask(obj, attr, value)
        return known[key]

    environment.is_safe_attribute = is_safe_attribute


def _find_all(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at != -1:
        found.append(at)
        at = text.find(needle, at + 1)
    return found


class ControlTokens:
    """The tokens that structure a conversation (BOS, EOS, the end of a turn, the token that
    opens one: `<|im_end|>`, `<|eot_id|>`, `</s>`, `<start_of_turn>` …), to find one written inside
    a message's text: the tokenizer would encode it as that token, and a turn would end or start
    in the middle of a turn. Markup a model writes inside its turns (`<think>`, `<tool_call>`) is
    not among them."""

    def __init__(self, tokens: list[str]):
        self.tokens = list(dict.fromkeys(t for t in tokens if t))
        self.by_start: dict[str, list[str]] = {}
        for token in self.tokens:
            self.by_start.setdefault(token[0], []).append(token)

    def find(self, text: str) -> str | None:
        """A control token written in `text`, if any (looked for only where its first character is)."""
        for char, tokens in self.by_start.items():
            at = text.find(char)
            while at != -1:
                if found := next((t for t in tokens if text.startswith(t, at)), None):
                    return found
                at = text.find(char, at + 1)
        return None


def added_tokens(tokenizer) -> tuple[str, ...]:
    """Added-token strings (special or not), longest first (so the longest match wins)."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    return tuple(sorted(added, key=len, reverse=True))
