"""``ldm serve``: the real command on a free loopback port, and a clear one-line error without the extra."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from latentdiffusion.cli.main import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_without_the_serve_extra_it_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert main(["serve", "--model", "preset:tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fastapi" in err and "pip install 'latentdiffusion[serve]'" in err


def test_the_command_line_stays_light():
    heavy = "('fastapi', 'uvicorn', 'torch')"
    code = f"import sys, latentdiffusion.cli.main; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ldm_serve_answers_on_loopback_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "latentdiffusion.cli.main", "serve", "--model", "preset:tiny"]
    command += ["--port", str(port), "--output-dir", str(tmp_path), "--max-size", "128"]
    env = {**os.environ, "LDM_API_KEY": "k"}  # the key from the environment, not the process list
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "ldm serve did not start"
                time.sleep(0.2)
        assert health["auth"] is True and health["limits"]["max_side"] == 128
        response = httpx.post(url + "/sdapi/v1/txt2img", json={"steps": 1, "seed": 3}, timeout=60)
        assert response.status_code == 401
        key = {"Authorization": "Bearer k"}
        response = httpx.post(
            url + "/sdapi/v1/txt2img", json={"steps": 1, "seed": 3}, headers=key, timeout=60
        )
        assert response.status_code == 200
        assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
