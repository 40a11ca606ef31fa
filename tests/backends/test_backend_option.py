"""``backend=`` / ``--backend``: the choice, auto, and the message without the openvino package (these run
whether or not openvino is installed)."""

from __future__ import annotations

import argparse
import sys

import pytest

import latentdiffusion as ld
from latentdiffusion.backends import attach_backend
from latentdiffusion.errors import UserError


def test_auto_is_torch_outside_bf16_and_unknown_backends_are_refused():
    pipe = ld.load("preset:tiny", backend="auto")  # float32 weights: OpenVINO measured no faster
    assert pipe.backend is None and pipe.served() is pipe.components
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        attach_backend(pipe, "tpu")


def test_auto_picks_openvino_for_bf16_only_where_measured_and_runs_the_rest_on_torch(monkeypatch):
    from latentdiffusion import backends
    from latentdiffusion.pipelines import precision

    pipe = ld.load("preset:tiny", precision="bf16")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(backends, "openvino_available", lambda: True)
    assert backends.auto_backend(pipe, "bf16") == "openvino"
    assert backends.auto_backend(pipe, "fp32") == "torch"
    monkeypatch.setattr(backends, "available_memory", lambda: 1000)  # not enough to convert
    assert backends.auto_backend(pipe, "bf16") == "torch"
    monkeypatch.setattr(backends, "available_memory", lambda: 2**40)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)  # bf16 emulated: not measured faster
    assert backends.auto_backend(pipe, "bf16") == "torch"


def test_without_openvino_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'latentdiffusion\[openvino\]'"):
        ld.load("preset:tiny", backend="openvino")


def test_the_cli_passes_backend_to_the_loader():
    from latentdiffusion.cli.common import add_model_option

    parser = argparse.ArgumentParser()
    add_model_option(parser)
    assert parser.parse_args(["--backend", "openvino"]).backend == "openvino"
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "tpu"])
