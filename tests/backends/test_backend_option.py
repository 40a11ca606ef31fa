"""``backend=`` / ``--backend``: the choice, auto, and the message without the openvino package (these run
whether or not openvino is installed)."""

from __future__ import annotations

import argparse
import sys

import pytest

import latentdiffusion as ld
from latentdiffusion.backends import attach_backend
from latentdiffusion.errors import UserError


def test_auto_is_torch_and_unknown_backends_are_refused():
    pipe = ld.load("preset:tiny", backend="auto")
    assert pipe.backend is None and pipe.served() is pipe.components
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        attach_backend(pipe, "tpu")


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
