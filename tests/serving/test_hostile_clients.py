"""Hostile clients (issue #16): connections that never finish their request head are timed out and capped
(a flood of them no longer turns every request into 503), bodies that stop arriving are timed out (408),
and text that is not valid Unicode is answered 422, never 500."""

from __future__ import annotations

import contextlib
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from latentdiffusion.serving.connections import ConnectionLimits
from latentdiffusion.serving.settings import Limits, ServerSettings

TEST_LIMITS = Limits(max_side=256, max_steps=150, max_images=4, queue_size=8)  # as conftest's

TXT2IMG, GENERATIONS = "/sdapi/v1/txt2img", "/v1/images/generations"
HALF_OPEN = 300


def address(server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port


def closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``within`` seconds, and what it sent before."""
    sock.settimeout(within)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except TimeoutError:
            return False, received
    return True, received


@pytest.fixture
def guarded_server(tiny_pipe, start_server):
    # concurrency below the flood: without the guard every request would be answered 503
    limits = ConnectionLimits(head_timeout=1.0, body_timeout=1.0, waiting=64, per_client=16, concurrency=128)
    with start_server(tiny_pipe, ServerSettings(limits=TEST_LIMITS, connections=limits)) as server:
        yield server


def test_half_open_connections_do_not_starve_health_or_generation(guarded_server):
    host, port = address(guarded_server)
    flood: list[socket.socket] = []
    start = time.monotonic()
    try:
        for _ in range(HALF_OPEN):  # each sends half a request head and then nothing
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            flood.append(sock)
        health = httpx.get(guarded_server.url + "/health", timeout=10)
        assert health.status_code == 200, health.text  # uvicorn alone: 503 (concurrency 128 < 300)
        assert health.json()["connections"]["waiting"] < 128
        response = httpx.post(
            guarded_server.url + TXT2IMG,
            json={"prompt": "x", "steps": 1, "width": 64, "height": 64},
            timeout=60,
        )
        assert response.status_code == 200 and len(response.json()["images"]) == 1
        deadline = time.monotonic() + 10  # the head timeout (1 s) closes the rest
        while (stats := connection_stats(guarded_server))["waiting"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["waiting"] == 0 and stats["timed_out"] + stats["evicted"] >= HALF_OPEN
        assert time.monotonic() - start < 30
    finally:
        for sock in flood:
            sock.close()


def connection_stats(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()["connections"]


def test_waiting_connections_are_capped_per_client(tiny_pipe, start_server):
    limits = ConnectionLimits(head_timeout=10.0, per_client=16, waiting=64)  # evicts after 1 s of waiting
    with start_server(tiny_pipe, ServerSettings(limits=TEST_LIMITS, connections=limits)) as server:
        host, port = address(server)
        with contextlib.ExitStack() as stack:
            old = [stack.enter_context(socket.create_connection((host, port), timeout=5)) for _ in range(16)]
            time.sleep(2.0)  # past the 1 s grace, with room for a loaded machine
            new = [stack.enter_context(socket.create_connection((host, port), timeout=5)) for _ in range(6)]
            assert all(closed_by_server(sock, within=5)[0] for sock in old[:6])  # the oldest six
            assert not any(closed_by_server(sock, within=0.2)[0] for sock in old[6:] + new)
            assert connection_stats(server)["evicted"] >= 6  # (7: the /health connection evicts one more)


def test_a_request_head_that_never_ends_is_closed(guarded_server):
    host, port = address(guarded_server)
    with (
        socket.create_connection((host, port), timeout=5) as silent,
        socket.create_connection((host, port), timeout=5) as slow,
    ):
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        assert closed_by_server(silent, within=5)[0]
        assert closed_by_server(slow, within=5)[0]
        assert time.monotonic() - start < 5
    assert connection_stats(guarded_server)["timed_out"] >= 2


def test_a_body_that_stops_arriving_is_a_408(guarded_server):
    host, port = address(guarded_server)
    with socket.create_connection((host, port), timeout=5) as sock:
        head = f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + b'Content-Length: 100\r\n\r\n{"prompt": ')
        _, answer = closed_by_server(sock, within=10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request body not received" in answer


def test_a_keep_alive_connection_still_serves_several_requests(guarded_server):
    with httpx.Client(base_url=guarded_server.url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200


def raw(body: bytes) -> dict:
    return {"content": body, "headers": {"Content-Type": "application/json"}}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (TXT2IMG, b'{"prompt": "\\ud800", "steps": 1}', "prompt is not valid Unicode"),
        (TXT2IMG, b'{"prompt": "x", "negative_prompt": "a\\udcffb"}', "negative_prompt is not valid Unicode"),
        (TXT2IMG, b'{"prompt": "x", "steps": 1, "extra": ["\\udcff"]}', "extra[0] is not valid Unicode"),
        (TXT2IMG, b'{"prompt": "x", "sampler_name": "\\ud800"}', "sampler_name is not valid Unicode"),
        (TXT2IMG, b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
        (GENERATIONS, b'{"prompt": "\\ud800"}', "prompt is not valid Unicode"),
        (GENERATIONS, b'{"prompt": "x", "size": "\\udfff"}', "size is not valid Unicode"),
        (GENERATIONS, b'{"prompt": "x", "\\ud800": 1}', "(a key) is not valid Unicode"),
    ],
)
def test_text_that_is_not_valid_unicode_is_a_422(server, path, body, message):
    response = httpx.post(server.url + path, timeout=30, **raw(body))
    assert response.status_code == 422, response.text
    payload = response.json()
    text = payload["error"]["message"] if path.startswith("/v1/") else payload["detail"]
    assert message in text
    assert server.state.queue.stats()["failed"] == 0


def test_an_output_folder_that_is_a_file_is_a_user_error(tiny_pipe, tmp_path):
    from latentdiffusion.errors import UserError
    from latentdiffusion.serving.app import create_app

    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match=r"cannot use .* as the output folder"):
        create_app(tiny_pipe, ServerSettings(output_dir=a_file))


def test_a_full_disk_in_the_output_folder_still_answers_the_images(tiny_pipe, start_server, tmp_path, caplog):
    import errno
    import os

    settings = ServerSettings(limits=TEST_LIMITS, output_dir=tmp_path / "out")
    with start_server(tiny_pipe, settings) as server:

        def full(images, seeds):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        server.state.outputs.save = full
        body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
        with caplog.at_level("ERROR", logger="latentdiffusion.serving.common"):
            response = httpx.post(server.url + TXT2IMG, json=body, timeout=60)
        assert response.status_code == 200 and len(response.json()["images"]) == 1
        assert "No space left on device" in caplog.text
