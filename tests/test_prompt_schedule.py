"""AUTOMATIC1111's prompt editing, alternation and AND, against the web UI's documentation: the wiki's
"Features" page (prompt editing, alternating words, composable diffusion) and the worked examples in its
``prompt_parser.py`` docstrings, whose schedules are exact answers."""

import pytest

from latentdiffusion.prompt_schedule import (
    Part,
    composable_schedules,
    prompt_schedule,
    prompts_per_step,
    split_parts,
    uses_syntax,
)


def schedule(text: str, steps: int = 10) -> list[list]:
    return [list(entry) for entry in prompt_schedule(text, steps)]


def test_wiki_fantasy_to_cyberpunk_after_step_16():
    steps = prompts_per_step("a [fantasy:cyberpunk:16] landscape", 100)
    assert steps[:17] == ["a fantasy landscape"] * 17  # steps 0..16 (the web UI counts from 0)
    assert steps[17:] == ["a cyberpunk landscape"] * 83


def test_wiki_multiple_edits_with_100_steps():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    documented = [  # "after step n": the text from step n + 1 on
        (0, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (26, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (51, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (61, "fantasy landscape with a lake and an oak in background masterful"),
        (76, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]
    expected = []
    for (start, text), end in zip(documented, [*(s for s, _ in documented[1:]), 100], strict=True):
        expected += [text] * (end - start)
    assert prompts_per_step(prompt, 100) == expected
    assert [last for last, _ in prompt_schedule(prompt, 100)] == [25, 50, 60, 75, 100]


def test_wiki_alternating_words():
    steps = prompts_per_step("[cow|horse] in a field", 4)
    assert steps[1:] == ["cow in a field", "horse in a field", "cow in a field"]  # steps 1, 2, 3
    steps = prompts_per_step("[cow|cow|horse|man|siberian tiger|ox|man] in a field", 9)
    assert steps[7] == "man in a field" and steps[8] == "cow in a field"  # "on step 8 it loops back"
    assert steps[0] == steps[1] == "cow in a field"  # step 0 uses the first option, as step 1 does


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("test", [[10, "test"]]),
        ("a [b:3]", [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
        ("a [unbalanced", [[10, "a [unbalanced"]]),
        ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
        ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
        ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
        ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
        ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
    ],
)
def test_web_ui_documented_schedules(text, expected):
    assert schedule(text) == expected


def test_hires_second_pass_rule():
    # fractions 1..2 span the second pass; whole numbers count on from the first pass's steps
    assert [list(e) for e in prompt_schedule("a [b:.5] c", 10, first_pass_steps=10)] == [[10, "a b c"]]
    assert [list(e) for e in prompt_schedule("a [b:1.5] c", 10, first_pass_steps=10)] == [
        [5, "a  c"],
        [10, "a b c"],
    ]
    assert prompts_per_step("[x:y:23]", 10, first_pass_steps=20) == ["x"] * 4 + ["y"] * 6


@pytest.mark.parametrize(
    "text",
    [
        "a (cat:1.2) on a [mat]",  # emphasis only: not prompt editing
        r"an \[escaped:bracket:3\] stays",
        "(a:b:c)",
        "a | b",  # | outside [...]: the web UI's grammar fails, the prompt is used as written
        "[a|b",
        "[a:b:c:1]",
        "[a:b]",  # no number: de-emphasis of "a:b"
        "x [a:b:1e1 y",
        "",
    ],
)
def test_text_without_constructs_is_kept_as_written(text):
    assert prompt_schedule(text, 20) == ((20, text),)
    assert not uses_syntax(text) or split_parts(text)[0].weighted


def test_colon_inside_emphasis_inside_an_edit():
    assert prompts_per_step("[(red:1.3):(blue:0.7):1] car, BREAK road", 3) == [
        "(red:1.3) car, BREAK road",
        "(red:1.3) car, BREAK road",
        "(blue:0.7) car, BREAK road",
    ]
    assert prompts_per_step("([cat|dog]:1.2)", 3) == ["(cat:1.2)", "(cat:1.2)", "(dog:1.2)"]


def test_escaped_brackets_are_text_and_stay_escaped():
    assert prompts_per_step(r"\[a\] [b:c:1]", 3) == [r"\[a\] b", r"\[a\] b", r"\[a\] c"]


def test_when_rules():
    assert prompts_per_step("[a:b:0]", 3) == ["b", "b", "b"]  # 0: to from the start
    assert prompts_per_step("[a:b:1]", 3) == ["a", "a", "b"]  # whole number: the step
    assert prompts_per_step("[a:b:1.0]", 3) == ["a", "a", "a"]  # a decimal point: a fraction (all)
    assert prompts_per_step("[male:female:0.0]", 3) == ["female"] * 3  # the wiki: female from the start
    assert prompts_per_step("[a:b:0.5]", 4) == ["a", "a", "a", "b"]  # int(0.5 * 4) = 2: steps 0..2
    assert prompts_per_step("[a:b:99]", 3) == ["a", "a", "a"]  # capped at the steps


def test_deep_nesting_and_long_prompts_do_not_break_the_parser():
    deep = "[" * 5000 + "a" + "]" * 5000
    assert prompt_schedule(deep, 4)[-1][0] == 4
    long = "[a|b] " * 300
    assert len(prompts_per_step(long, 3)) == 3


def test_and_parts_with_weights_as_the_wiki_writes_them():
    assert split_parts("a cat :1.2 AND a dog AND a penguin :2.2") == [
        Part("a cat", 1.2, True),
        Part(" a dog", 1.0),
        Part(" a penguin", 2.2, True),
    ]
    assert split_parts("a cat") == [Part("a cat")]
    assert split_parts("a cat :0.5") == [Part("a cat", 0.5, True)]  # a weight without AND, as the web UI
    assert split_parts("BRANDED ANDROID") == [Part("BRANDED ANDROID")]  # the whole word only
    parts = composable_schedules("[a:b:1] AND c :2", 3)
    assert parts == [(1.0, ((1, "a"), (3, "b"))), (2.0, ((3, " c"),))]


def test_uses_syntax():
    assert not uses_syntax("a (red:1.2) cat, [blurry]")
    assert uses_syntax("a [red:blue:5] cat")
    assert uses_syntax("a [red|blue] cat")
    assert uses_syntax("a cat AND a dog")
    assert uses_syntax("a cat :1")
    assert not uses_syntax("ugly AND blurry", negative=True)  # AND is text in negative prompts
    assert uses_syntax("[ugly:blurry:3]", negative=True)
