"""AUTOMATIC1111's prompt editing, alternation and composable ``AND``: one prompt -> weighted parts, each a
schedule of plain prompts over the sampling steps. Each plain prompt keeps its emphasis syntax
(``(word:1.2)``, ``[word]``, BREAK) and is encoded by ``prompts.py`` as any prompt is.

The web UI's rules (its wiki, "Features": prompt editing, alternating words, composable diffusion;
its ``prompt_parser.py`` for the details):

- ``[from:to:when]`` draws ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``, ``[from::when]`` removes ``from`` after it. Edits nest. ``when`` with a decimal point
  is a fraction of the steps (``0.25`` of 100 steps: 25), without one a step number; the step is
  ``min(steps, int(value))``. Steps are counted from 0 and step ``i`` uses ``from`` while
  ``i <= when``: ``[fantasy:cyberpunk:16]`` draws fantasy at steps 0..16, cyberpunk from 17.
- ``[a|b|c]`` alternates: step ``i`` uses option ``(max(i, 1) - 1) % n`` (the web UI's schedule
  gives steps 0 and 1 the first option). Options may be empty (``[fe|]male``) and nest.
- In a hires-fix second pass (``first_pass_steps`` given), a whole number counts on from the first
  pass (``[a:b:25]`` after 20 first-pass steps: second-pass step 5) and a fraction from 1.0 to 2.0 is
  a fraction of the second pass (``1.5``: its middle); fractions below 1 have passed already.
- ``a cat :1.2 AND a dog :0.8`` composes parts (Liu et al. 2022): each part's own trailing
  ``:weight`` (default 1; read even without ``AND``, as the web UI does), each part scheduled on its
  own. Negative prompts are scheduled but not split: ``AND`` there is plain text (the web UI encodes
  negative prompts with its non-composable path).
- Brackets that do not form one of these constructs (``[word]``, ``(word:1.2)``, unbalanced ones)
  are kept as text for the emphasis parser; a ``|`` outside ``[...]`` makes the whole prompt plain
  text, as the web UI's grammar fails there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

Schedule = tuple[tuple[int, str], ...]  # (last step, plain prompt) in order: the web UI's prompt schedule

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")
_TOKEN = re.compile(r"(?:[^\\\[\]():|]|\\.)+|[\[\]():|]", re.DOTALL)
_NUMBER = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*")
_SPECIAL = set("[]():|")


@dataclass(frozen=True)
class Edit:
    """``[before:after:when]``: ``when`` as written (its decimal point decides how it counts)."""

    before: tuple[Node, ...]
    after: tuple[Node, ...]
    when: str


@dataclass(frozen=True)
class Alternation:
    options: tuple[tuple[Node, ...], ...]


Node = str | Edit | Alternation


class _Unparsable(Exception):
    """The prompt is not in the web UI's grammar: it is used as written."""


class _Parser:
    """Recursive descent over the web UI's prompt grammar. Inside brackets every bracket must form a
    construct; at the top level a bracket or colon that forms none is text. Constructs are preferred
    over loose brackets wherever both parse. Results per position are memoised, so nested failures
    cost time linear in their length, not exponential."""

    def __init__(self, text: str) -> None:
        self.tokens = _TOKEN.findall(text)
        if "".join(self.tokens) != text:  # a lone backslash at the end
            raise _Unparsable
        self.memo: dict[tuple[str, int], tuple[tuple[Node, ...], int] | None] = {}

    def parse(self) -> tuple[Node, ...]:
        nodes, i = self.sequence(0, top=True)
        assert i == len(self.tokens)
        return nodes

    def token(self, i: int) -> str | None:
        return self.tokens[i] if i < len(self.tokens) else None

    def sequence(self, i: int, *, top: bool) -> tuple[tuple[Node, ...], int]:
        """Nodes from token ``i`` up to the first token this level cannot take."""
        nodes: list[Node] = []
        while (token := self.token(i)) is not None:
            if token in "[(" and (construct := self.construct(token, i)) is not None:
                nodes.extend(construct[0])
                i = construct[1]
            elif token not in _SPECIAL:
                nodes.append(token)
                i += 1
            elif not top:
                break
            elif token == "|":
                raise _Unparsable
            else:  # a loose bracket or colon
                nodes.append(token)
                i += 1
        return tuple(nodes), i

    def construct(self, bracket: str, i: int) -> tuple[tuple[Node, ...], int] | None:
        key = (bracket, i)
        if key not in self.memo:
            self.memo[key] = self.square(i) if bracket == "[" else self.round(i)
        return self.memo[key]

    def round(self, i: int) -> tuple[tuple[Node, ...], int] | None:
        """``(a)`` or ``(a:b)``: emphasis, kept as text around the nodes inside."""
        first, j = self.sequence(i + 1, top=False)
        if self.token(j) == ")":
            return ("(", *first, ")"), j + 1
        if self.token(j) == ":":
            second, k = self.sequence(j + 1, top=False)
            if self.token(k) == ")":
                return ("(", *first, ":", *second, ")"), k + 1
        return None

    def square(self, i: int) -> tuple[tuple[Node, ...], int] | None:
        """``[a]`` (emphasis, kept as text), ``[a|b]``, ``[to:when]`` or ``[from:to:when]``."""
        first, j = self.sequence(i + 1, top=False)
        token = self.token(j)
        if token == "]":
            return ("[", *first, "]"), j + 1
        if token == "|":
            options = [first]
            while self.token(j) == "|":
                option, j = self.sequence(j + 1, top=False)
                options.append(option)
            return ((Alternation(tuple(options)),), j + 1) if self.token(j) == "]" else None
        if token != ":":
            return None
        when = self.when(j + 1)
        if when is not None:
            return (Edit((), first, when),), j + 3
        second, k = self.sequence(j + 1, top=False)
        when = self.when(k + 1) if self.token(k) == ":" else None
        return ((Edit(first, second, when),), k + 3) if when is not None else None

    def when(self, i: int) -> str | None:
        """The number at token ``i`` if ``]`` follows it."""
        token = self.token(i)
        if token is None or self.token(i + 1) != "]":
            return None
        match = _NUMBER.fullmatch(token)
        return match[1] if match else None


def parse(text: str) -> tuple[Node, ...] | None:
    """The prompt's editing constructs, or None when it is not in the grammar (used as written)."""
    try:
        return _Parser(text).parse()
    except (_Unparsable, RecursionError):
        return None


@dataclass
class _Timing:
    """How ``when`` values count: ``steps`` of this run, and the hires-fix offsets."""

    steps: int
    step_offset: int = 0
    fraction_offset: float = 0.0
    known: dict[str, int] = field(default_factory=dict)

    def step(self, when: str) -> int:
        if when not in self.known:
            value = float(when)
            value = (value - self.fraction_offset) * self.steps if "." in when else value - self.step_offset
            self.known[when] = min(self.steps, int(value))
        return self.known[when]


def _switch_steps(nodes: Sequence[Node], timing: _Timing, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, Edit):
            step = timing.step(node.when)
            if step >= 1:
                found.add(step)
            _switch_steps(node.before, timing, found)
            _switch_steps(node.after, timing, found)
        elif isinstance(node, Alternation):
            found.update(range(1, timing.steps + 1))
            for option in node.options:
                _switch_steps(option, timing, found)


def _text_at(nodes: Sequence[Node], step: int, timing: _Timing) -> str:
    pieces = []
    for node in nodes:
        if isinstance(node, str):
            pieces.append(node)
        elif isinstance(node, Edit):
            branch = node.before if step <= timing.step(node.when) else node.after
            pieces.append(_text_at(branch, step, timing))
        else:
            pieces.append(_text_at(node.options[(step - 1) % len(node.options)], step, timing))
    return "".join(pieces)


def prompt_schedule(text: str, steps: int, *, first_pass_steps: int | None = None) -> Schedule:
    """The web UI's schedule of ``text`` over ``steps``: (last step, plain prompt) pairs, the last
    pair ending at ``steps``; ``first_pass_steps`` for a hires-fix second pass of ``steps`` steps."""
    nodes = parse(text)
    if nodes is None:
        return ((steps, text),)
    if first_pass_steps is None:
        timing = _Timing(steps)
    else:
        timing = _Timing(steps, step_offset=first_pass_steps, fraction_offset=1.0)
    found = {steps}
    _switch_steps(nodes, timing, found)
    return tuple((step, _text_at(nodes, step, timing)) for step in sorted(found))


def text_at_step(schedule: Schedule, step: int) -> str:
    """The plain prompt of step ``step`` (from 0): the first entry that lasts to at least ``step`` (the
    first entry past the end, as the web UI falls back)."""
    return next((text for last, text in schedule if step <= last), schedule[0][1])


def prompts_per_step(text: str, steps: int, *, first_pass_steps: int | None = None) -> list[str]:
    """The plain prompt of each of the ``steps`` steps, in order."""
    schedule = prompt_schedule(text, steps, first_pass_steps=first_pass_steps)
    return [text_at_step(schedule, i) for i in range(steps)]


@dataclass(frozen=True)
class Part:
    """One ``AND`` part: its text and weight; ``weighted`` when the weight was written."""

    text: str
    weight: float = 1.0
    weighted: bool = False


def split_parts(prompt: str) -> list[Part]:
    """``prompt`` split on the word ``AND`` (uppercase) into parts with their trailing ``:weight``.
    Without ``AND`` and a weight, the one part is the prompt exactly as written."""
    pieces = _AND.split(prompt)
    parts = []
    for piece in pieces:
        match = _PART_WEIGHT.search(piece)
        if match is not None:
            parts.append(Part(piece[: match.start()], float(match[1]), True))
        else:
            parts.append(Part(piece.rstrip() if len(pieces) > 1 else piece))
    return parts


def uses_syntax(prompt: str, *, negative: bool = False) -> bool:
    """Whether ``prompt`` holds any of these constructs (else it is encoded exactly as written); edits
    and alternations inside emphasis are found too, as emphasis is kept as text around its nodes."""
    if not negative:
        parts = split_parts(prompt)
        if len(parts) > 1 or parts[0].weighted:
            return True
    nodes = parse(prompt)
    return nodes is not None and any(isinstance(node, Edit | Alternation) for node in nodes)


def composable_schedules(
    prompt: str, steps: int, *, first_pass_steps: int | None = None
) -> list[tuple[float, Schedule]]:
    """Each ``AND`` part of ``prompt`` as (weight, schedule)."""
    return [
        (part.weight, prompt_schedule(part.text, steps, first_pass_steps=first_pass_steps))
        for part in split_parts(prompt)
    ]
