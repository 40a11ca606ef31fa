"""benchmarks/cpu.py's side environment: the optimum-intel contender's worker runs under the interpreter
``$LDM_OPTIMUM_PYTHON`` names, with this project's source on its path, and is reported as not run, with
the reason in one line, wherever that environment is missing or cannot import optimum-intel. (Running it
needs that environment, which CI does not build; docs/benchmarks.md has the measured run.)"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # how cpu.py and its workers import them
    import cpu
    import openvino_contenders
    import optimum_contender

    return argparse.Namespace(cpu=cpu, contenders=openvino_contenders, optimum=optimum_contender)


def test_without_a_side_environment_the_reason_names_the_variable(bench, monkeypatch):
    monkeypatch.delenv("LDM_OPTIMUM_PYTHON", raising=False)
    reason = bench.contenders.available(bench.contenders.OPTIMUM)
    assert "LDM_OPTIMUM_PYTHON" in reason and "transformers" in reason and "\n" not in reason
    assert bench.contenders.python_for(bench.contenders.OPTIMUM) is None


def test_a_missing_interpreter_is_named(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_OPTIMUM_PYTHON", str(tmp_path / "nowhere" / "python"))
    reason = bench.contenders.available(bench.contenders.OPTIMUM)
    assert reason == f"LDM_OPTIMUM_PYTHON={tmp_path / 'nowhere' / 'python'}: no such interpreter"


def test_an_interpreter_without_optimum_intel_gives_its_import_error(bench, monkeypatch):
    from importlib.util import find_spec

    if find_spec("optimum") is not None:
        pytest.skip("this interpreter has optimum")
    monkeypatch.setenv("LDM_OPTIMUM_PYTHON", sys.executable)
    reason = bench.contenders.available(bench.contenders.OPTIMUM)
    assert "cannot import optimum-intel's pipeline" in reason and "ModuleNotFoundError" in reason
    assert "\n" not in reason


def test_a_working_side_environment_runs_the_contenders_worker(bench, monkeypatch, tmp_path):
    python = tmp_path / "python"  # an interpreter whose probe succeeds
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    monkeypatch.setenv("LDM_OPTIMUM_PYTHON", str(python))
    chosen, skipped = bench.cpu.openvino_configs(bf16=False)
    config = next(c for c in chosen if c.name == bench.contenders.OPTIMUM)
    assert config.python == str(python) and config.side == "openvino"
    assert not any(line.startswith(bench.contenders.OPTIMUM) for line in skipped)
    assert all(c.python is None for c in chosen if c.name != bench.contenders.OPTIMUM)


def test_the_worker_command_uses_the_side_interpreter_and_the_source_tree(bench):
    job = {"config": {"name": "x", "python": None}, "task": "unet"}
    command, env = bench.cpu.worker_command(job, {"PYTHONPATH": "/elsewhere"})
    assert command[0] == sys.executable and env == {"PYTHONPATH": "/elsewhere"}
    job["config"]["python"] = "/side/bin/python"
    command, env = bench.cpu.worker_command(job, {"PYTHONPATH": "/elsewhere"})
    assert command[0] == "/side/bin/python" and command[2] == "--worker"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), "/elsewhere"]
    assert bench.cpu.worker_command(job, {})[1]["PYTHONPATH"] == str(ROOT / "src")


def test_the_openvino_deepcache_row_times_images_at_the_fast_interval(bench):
    from latentdiffusion.pipelines.deepcache import FAST_CACHE_INTERVAL

    pytest.importorskip("openvino")
    chosen, _ = bench.cpu.openvino_configs(bf16=True)
    config = next(c for c in chosen if c.name == bench.contenders.CACHED)
    assert config.cache_interval == FAST_CACHE_INTERVAL and config.precision == "bf16"
    driver = bench.cpu.Driver.__new__(bench.cpu.Driver)  # only _wants_image's arguments are needed
    driver.args = argparse.Namespace(quick=True)
    assert driver._wants_image(config)
    plain = next(c for c in chosen if c.name == "ours OpenVINO bf16")
    assert plain.cache_interval is None and not driver._wants_image(plain)
