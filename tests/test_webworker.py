"""The web's gunicorn worker class (bgfn.webworker): a pool thread may linger on a kept-alive
connection for its next request. Under a real `bgfn serve`, over raw sockets, so the connection each
answer comes on is known: kept-alive connections keep being served whether their next request comes
at once, later or pipelined, and a lingering thread never keeps another connection waiting."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import wait_for

SITE = {
    "functions/echo.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": "echo " + (event["queryStringParameters"].get("n") or "")}
    """,
    "functions/gate.py": """
        import os, time

        def handler(event, context):
            folder = event["queryStringParameters"]["dir"]
            open(os.path.join(folder, "started"), "w").close()
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(folder, "open")) and time.monotonic() < deadline:
                time.sleep(0.01)
            return {"statusCode": 200, "body": "gate passed"}
    """,
}


class Connection:
    """One kept-alive HTTP/1.1 connection, requests written and answers read by hand."""

    def __init__(self, base: str, timeout: float = 10.0) -> None:
        address = urlsplit(base)
        self.sock = socket.create_connection((address.hostname or "127.0.0.1", address.port or 80), timeout=timeout)
        self.buffer = b""

    def send(self, *paths: str) -> None:
        self.sock.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: test\r\n\r\n".encode() for p in paths))

    def answer(self) -> tuple[int, str]:
        """The next answer's status and body (raises socket.timeout when none comes in time)."""
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers.get("connection", "keep-alive").lower() != "close", lines
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), body.decode()

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


def test_a_kept_alive_connection_is_served_at_once_later_and_pipelined(
        site: Path, start_server: Callable[..., str]) -> None:
    base = start_server(site, BGFN_WEB_WORKERS="1", BGFN_WEB_THREADS="2", BGFN_WEB_LINGER="0.05")
    conn = Connection(base)
    try:
        for n in range(5):  # each sent as soon as the last is answered: served by the lingering thread
            conn.send(f"/.netlify/functions/echo?n={n}")
            assert conn.answer() == (200, f"echo {n}")
        time.sleep(0.3)  # past the linger (0.05 s): the connection is back with gunicorn's poller
        conn.send("/.netlify/functions/echo?n=late")
        assert conn.answer() == (200, "echo late")
        conn.send(*(f"/.netlify/functions/echo?n=p{n}" for n in range(3)))  # pipelined, in one write
        assert [conn.answer() for _ in range(3)] == [(200, "echo p0"), (200, "echo p1"), (200, "echo p2")]
    finally:
        conn.close()


def test_a_lingering_thread_gives_way_to_a_connection_that_would_wait(
        site: Path, start_server: Callable[..., str], tmp_path: Path) -> None:
    """Two threads, a linger of a minute: one thread lingers on connection A, the other is held by a
    call on B; C's request must be answered at once (the lingering thread hands A back and takes C),
    not after A's linger."""
    base = start_server(site, BGFN_WEB_WORKERS="1", BGFN_WEB_THREADS="2", BGFN_WEB_LINGER="60")
    gate = tmp_path / "gate"
    gate.mkdir()
    # Each connection is opened when it is used: gunicorn gives a new connection a thread at once.
    a = Connection(base)
    opened = [a]
    try:
        for n in range(3):  # by the last, start_server's own check has surely hung up (else no thread lingers)
            a.send(f"/.netlify/functions/echo?n=a{n}")
            assert a.answer() == (200, f"echo a{n}")  # its thread now lingers on A
        b = Connection(base)
        opened.append(b)
        b.send(f"/.netlify/functions/gate?dir={gate}")
        wait_for(lambda: (gate / "started").exists(), what="the call on B to hold the other thread")
        c = Connection(base, timeout=10)
        opened.append(c)
        c.send("/.netlify/functions/echo?n=c")
        assert c.answer() == (200, "echo c")  # socket.timeout after 10 s if it waited for A's linger
        (gate / "open").touch()
        assert b.answer() == (200, "gate passed")
        a.send("/.netlify/functions/echo?n=again")  # A, handed back to gunicorn's poller, is still served
        assert a.answer() == (200, "echo again")
    finally:
        for conn in opened:
            conn.close()


def test_more_connections_than_threads_are_all_served_in_turn(
        site: Path, start_server: Callable[..., str]) -> None:
    """Six kept-alive connections on one process with two threads: each answer's connection goes back
    to gunicorn's poller from the thread that served it, and every request is answered, in order."""
    base = start_server(site, BGFN_WEB_WORKERS="1", BGFN_WEB_THREADS="2")
    conns = [Connection(base) for _ in range(6)]
    try:
        for n in range(20):
            for i, conn in enumerate(conns):
                conn.send(f"/.netlify/functions/echo?n={i}-{n}")
            assert [conn.answer() for conn in conns] == [(200, f"echo {i}-{n}") for i in range(len(conns))]
    finally:
        for conn in conns:
            conn.close()


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
        site: Path, start_server: Callable[..., str]) -> None:
    """A connection put back in the poller by its thread is still one gunicorn keeps track of: it
    closes it once idle for its keep-alive timeout (2 s), not never."""
    base = start_server(site, BGFN_WEB_WORKERS="1", BGFN_WEB_THREADS="2")
    conn = Connection(base, timeout=15)
    try:
        conn.send("/.netlify/functions/echo?n=1")
        assert conn.answer() == (200, "echo 1")
        began = time.monotonic()
        assert conn.sock.recv(1) == b""  # the server hung up (socket.timeout after 15 s if it never does)
        assert time.monotonic() - began < 12
    finally:
        conn.close()


def test_settled_config_reads_each_setting_once_and_forgets_a_value_it_is_given() -> None:
    from bgfn.webworker import SettledConfig

    cfg = SettledConfig()
    assert cfg.threads == 1 and "threads" in cfg.__dict__  # read through gunicorn's Config, then kept
    cfg.set("threads", 8)
    assert cfg.threads == 8
    with pytest.raises(AttributeError):
        cfg.no_such_setting  # noqa: B018


def test_no_linger_serves_kept_alive_connections_as_gthread_does(
        site: Path, start_server: Callable[..., str]) -> None:
    base = start_server(site, BGFN_WEB_WORKERS="1", BGFN_WEB_THREADS="1", BGFN_WEB_LINGER="0")
    first, second = Connection(base), Connection(base)
    try:
        for n in range(3):
            for conn, name in ((first, "f"), (second, "s")):
                conn.send(f"/.netlify/functions/echo?n={name}{n}")
                assert conn.answer() == (200, f"echo {name}{n}")
    finally:
        first.close()
        second.close()
