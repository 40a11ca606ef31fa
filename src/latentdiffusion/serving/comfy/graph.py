"""A ComfyUI workflow in its API format, ``{node_id: {"class_type": ..., "inputs": {...}}}``: node types
as data (what /object_info describes), validation with ComfyUI's error objects (``execution.py``:
``validate_prompt``/``validate_inputs``), and the order to evaluate the nodes an output needs.

An input is a constant or a link ``[node_id, output_index]``. Validation starts at the output nodes
(SaveImage, PreviewImage) and checks each node they need: known type, every required input present,
links to existing outputs of the right type, numbers within their bounds, choices among the offered
ones, and each type's own check (a file that exists, a prompt within the length limit). A workflow is
refused (HTTP 400) when no output passes; outputs whose nodes fail are reported in ``node_errors`` and
left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_NODES = 500  # nodes in one workflow (validation and evaluation recurse along links)
Choices = Callable[[Any], list[str]]  # the context -> the values a choice input offers now
Check = Callable[[Any, dict[str, Any]], list[tuple[str, str]]]  # (context, constants) -> [(input, why)]
Error = dict[str, Any]


@dataclass(frozen=True)
class Input:
    """One input: a type name ("INT", "FLOAT", "STRING", "BOOLEAN", "MODEL", "LATENT", ...) or, for a
    choice, the function listing its values; ``options`` as ComfyUI describes them (default, min, max)."""

    kind: str | Choices
    options: Mapping[str, Any] = field(default_factory=dict)
    listed_only: bool = True  # False: any text, checked by the node (LoadImage: "name [output]" too)

    def describe(self, context: Any) -> list[Any]:
        """The input as /object_info lists it: ``[type, options]`` or ``[[values...], options]``."""
        kind = self.kind if isinstance(self.kind, str) else self.kind(context)
        options = {k: v(context) if callable(v) else v for k, v in self.options.items()}
        return [kind, options] if options else [kind]


@dataclass(frozen=True)
class NodeType:
    """A node type: its inputs and outputs as ComfyUI declares them, and ``run(context, **inputs)``,
    which returns the outputs (a tuple) or, for an output node, its UI dict (``{"images": [...]}``)."""

    name: str
    display_name: str
    category: str
    run: Callable[..., Any]
    required: Mapping[str, Input]
    optional: Mapping[str, Input] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    hidden: Mapping[str, str] = field(default_factory=dict)
    check: Check | None = None
    description: str = ""

    def inputs(self) -> dict[str, Input]:
        return {**self.required, **self.optional}

    def info(self, context: Any) -> dict[str, Any]:
        """This node's /object_info entry."""
        inputs: dict[str, Any] = {"required": {k: v.describe(context) for k, v in self.required.items()}}
        if self.optional:
            inputs["optional"] = {k: v.describe(context) for k, v in self.optional.items()}
        if self.hidden:
            inputs["hidden"] = dict(self.hidden)
        return {
            "input": inputs,
            "input_order": {part: list(values) for part, values in inputs.items() if part != "hidden"},
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": "nodes",
            "category": self.category,
            "output_node": self.output_node,
        }


def error(kind: str, message: str, details: str = "", **extra: Any) -> Error:
    """ComfyUI's error object."""
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


@dataclass
class Validation:
    """The outcome: ``error`` None and the outputs to run, or the refusal; ``node_errors`` either way."""

    error: Error | None
    outputs: list[str]
    node_errors: dict[str, Any]


class InvalidPrompt(Exception):
    """The workflow as a whole cannot run (not a graph, unknown node type, no outputs)."""

    def __init__(self, error: Error) -> None:
        super().__init__(error["message"])
        self.error = error


def validate(prompt: Any, types: Mapping[str, NodeType], context: Any) -> Validation:
    """Check a workflow as ComfyUI does; constants are converted to their types in place."""
    try:
        outputs = output_nodes(prompt, types)
    except InvalidPrompt as refusal:
        return Validation(refusal.error, [], {})
    checker = _Checker(prompt, types, context)
    good, reasons = [], []
    for node_id in outputs:
        if checker.node(node_id) and not checker.cycle(node_id):
            good.append(node_id)
        else:
            reasons.append(node_id)
    node_errors = checker.node_errors(reasons)
    if not good:
        lines = [f"{e['message']}: {e['details']}" for e in _all_errors(node_errors)]
        failed = error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines)
        )
        return Validation(failed, [], node_errors)
    return Validation(None, good, node_errors)


def output_nodes(prompt: Any, types: Mapping[str, NodeType]) -> list[str]:
    """The output nodes' ids; InvalidPrompt for a workflow that is not a graph of known nodes."""
    if not isinstance(prompt, dict) or not prompt:
        raise InvalidPrompt(error("invalid_prompt", "The prompt must be a non-empty object of nodes", ""))
    if len(prompt) > MAX_NODES:
        message = f"The prompt has {len(prompt)} nodes; this server runs at most {MAX_NODES}"
        raise InvalidPrompt(error("invalid_prompt", message, ""))
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            raise InvalidPrompt(error("invalid_prompt", message, f"Node ID '#{node_id}'"))
        kind = node["class_type"]
        if not isinstance(kind, str) or kind not in types:
            message = f"Cannot execute because node {kind} does not exist."
            raise InvalidPrompt(error("invalid_prompt", message, f"Node ID '#{node_id}'"))
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidPrompt(
                error("invalid_prompt", "A node's inputs must be an object", f"Node ID '#{node_id}'")
            )
        if types[kind].output_node:
            outputs.append(node_id)
    if not outputs:
        raise InvalidPrompt(error("prompt_no_outputs", "Prompt has no outputs"))
    return sorted(outputs, key=_id_order)


def evaluation_order(
    prompt: Mapping[str, Any], outputs: list[str], types: Mapping[str, NodeType]
) -> list[str]:
    """Every node the outputs need through their declared inputs, each after the nodes it links to
    (validated: no cycles; links in inputs a node does not declare are not followed, as not used)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        node = prompt[node_id]
        declared = types[node["class_type"]].inputs()
        for name, value in node.get("inputs", {}).items():
            if name in declared and is_link(value):
                visit(str(value[0]))
        order.append(node_id)

    for node_id in outputs:
        visit(node_id)
    return order


def is_link(value: Any) -> bool:
    return isinstance(value, list)


def _id_order(node_id: str) -> tuple[int, Any]:
    return (0, int(node_id)) if str(node_id).isdigit() else (1, str(node_id))


def _all_errors(node_errors: dict[str, Any]) -> list[Error]:
    return [e for entry in node_errors.values() for e in entry["errors"]]


class _Checker:
    """Validates nodes once each (ComfyUI's ``validate_inputs`` with its ``validated`` memo)."""

    def __init__(self, prompt: dict, types: Mapping[str, NodeType], context: Any) -> None:
        self.prompt, self.types, self.context = prompt, types, context
        self.results: dict[str, tuple[bool, list[Error]]] = {}
        self.dependents: dict[str, list[str]] = {}

    def node(self, node_id: str) -> bool:
        if node_id in self.results:
            return self.results[node_id][0]
        self.results[node_id] = (True, [])  # provisional: a cycle back here is caught by ``cycle``
        node = self.prompt[node_id]
        kind = self.types[node["class_type"]]
        inputs = node.setdefault("inputs", {})
        errors: list[Error] = []
        valid = True
        constants: dict[str, Any] = {}
        for name, spec in kind.inputs().items():
            if name not in inputs:
                if name in kind.required:
                    errors.append(
                        error("required_input_missing", "Required input is missing", name, input_name=name)
                    )
                continue
            value = inputs[name]
            if is_link(value):
                problem = self._link(name, value, spec)
                if problem is not None:
                    errors.append(problem)
                elif not self.node(str(value[0])):
                    valid = False
                continue
            converted, problem = self._constant(name, value, spec)
            if problem is not None:
                errors.append(problem)
                continue
            inputs[name] = constants[name] = converted
        if not errors and kind.check is not None:
            for name, why in kind.check(self.context, constants):
                errors.append(
                    error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"{name} - {why}",
                        input_name=name,
                    )
                )
        self.results[node_id] = (valid and not errors, errors)
        return self.results[node_id][0]

    def _link(self, name: str, value: list, spec: Input) -> Error | None:
        bad = error(
            "bad_linked_input",
            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
            name,
            input_name=name,
            received_value=value,
        )
        if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
            return bad
        source = self.prompt.get(str(value[0]))
        if source is None:
            return error(
                "bad_linked_input",
                f"Linked node {value[0]} does not exist",
                name,
                input_name=name,
                received_value=value,
            )
        outputs = self.types[source["class_type"]].outputs
        if not 0 <= value[1] < len(outputs):
            return bad
        expected = spec.kind if isinstance(spec.kind, str) else "COMBO"
        if outputs[value[1]] != expected:
            return error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({outputs[value[1]]}) mismatch input_type({expected})",
                input_name=name,
                received_type=outputs[value[1]],
                linked_node=value,
            )
        return None

    def _constant(self, name: str, value: Any, spec: Input) -> tuple[Any, Error | None]:
        kind = spec.kind
        if callable(kind) and not spec.listed_only:
            kind = "STRING"
        elif callable(kind):
            choices = kind(self.context)
            if value not in choices:
                return value, self._not_in_list(name, value, choices)
            return value, None
        try:
            converted = _convert(kind, value)
        except (TypeError, ValueError, OverflowError) as problem:
            return value, error(
                "invalid_input_type",
                f"Failed to convert an input value to a {kind} value",
                f"{name}, {value}, {problem}",
                input_name=name,
                received_value=value,
            )
        if kind not in ("INT", "FLOAT"):
            return converted, None
        options = {k: v(self.context) if callable(v) else v for k, v in spec.options.items()}
        if "min" in options and converted < options["min"]:
            message = f"Value {converted} smaller than min of {options['min']}"
            return converted, error(
                "value_smaller_than_min", message, name, input_name=name, received_value=value
            )
        if "max" in options and converted > options["max"]:
            message = f"Value {converted} bigger than max of {options['max']}"
            return converted, error(
                "value_bigger_than_max", message, name, input_name=name, received_value=value
            )
        return converted, None

    def _not_in_list(self, name: str, value: Any, choices: list[str]) -> Error:
        details = self.context.explain_choice(name, value)
        shown = str(choices) if len(choices) <= 20 else f"(list of length {len(choices)})"
        return error(
            "value_not_in_list",
            "Value not in list",
            details or f"{name}: '{value}' not in {shown}",
            input_name=name,
            received_value=value,
        )

    def cycle(self, start: str) -> bool:
        """True (and an error on the node) if the nodes ``start`` needs link back to one another."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done

        def visit(node_id: str) -> bool:
            state[node_id] = 1
            for value in self.prompt[node_id].get("inputs", {}).values():
                if is_link(value) and str(value[0]) in self.prompt:
                    other = str(value[0])
                    if state.get(other) == 1:
                        _, errors = self.results.get(other, (True, []))
                        message = "Dependency cycle detected"
                        self.results[other] = (
                            False,
                            [*errors, error("dependency_cycle", message, f"Node ID '#{other}'")],
                        )
                        return True
                    if other not in state and visit(other):
                        return True
            state[node_id] = 2
            return False

        return visit(start)

    def node_errors(self, failed_outputs: list[str]) -> dict[str, Any]:
        """ComfyUI's ``node_errors``: nodes with errors of their own, and the outputs they break."""
        found: dict[str, Any] = {}
        for output in failed_outputs:
            for node_id in self._needed(output):
                ok, errors = self.results.get(node_id, (True, []))
                if ok or not errors:
                    continue
                entry = found.setdefault(
                    node_id,
                    {
                        "errors": errors,
                        "dependent_outputs": [],
                        "class_type": self.prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
        return found

    def _needed(self, output: str) -> list[str]:
        seen, stack = [], [output]
        while stack:
            node_id = stack.pop()
            if node_id in seen or node_id not in self.prompt:
                continue
            seen.append(node_id)
            stack += [
                str(v[0])
                for v in self.prompt[node_id].get("inputs", {}).values()
                if is_link(v) and len(v) == 2
            ]
        return seen


def _convert(kind: str, value: Any) -> Any:
    """A constant as its declared type (ComfyUI converts with int(), float(), str())."""
    if kind == "INT":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return int(value)
    if kind == "FLOAT":
        converted = float(value)
        if not math.isfinite(converted):
            raise ValueError("not a finite number")
        return converted
    if kind == "STRING":
        if not isinstance(value, str | int | float):
            raise TypeError(f"expected text, got {type(value).__name__}")
        return str(value)
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {type(value).__name__}")
        return value
    raise TypeError(f"a {kind} input takes a link [node_id, output_index], not a constant")
