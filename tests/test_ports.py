"""The port helper every server fixture uses (conftest.free_ports): n distinct ports per call, never one handed out
before, none a server can lose to a port-0 bind, all sockets held until all n are chosen."""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Iterator

import conftest
import pytest
from conftest import RAY_DEFAULT_PORTS, free_ports, port_range


class FakeKernel:
    """Port bookkeeping as the kernel does it: a port is bindable while no open socket holds it."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.most_held = 0

    def socket(self) -> FakeSocket:
        return FakeSocket(self)


class FakeSocket:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel, self.port = kernel, None

    def bind(self, address: tuple[str, int]) -> None:
        port = address[1]
        if port in self.kernel.held:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.kernel.held.add(port)
        self.kernel.most_held = max(self.kernel.most_held, len(self.kernel.held))
        self.port = port

    def close(self) -> None:
        if self.port is not None:
            self.kernel.held.discard(self.port)
            self.port = None


class Scripted(random.Random):
    """An rng whose draws are given: the worst case where the same port comes up again and again."""

    def __init__(self, draws: list[int]) -> None:
        super().__init__(0)
        self.draws = iter(draws)

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        return next(self.draws)


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """Scripted draws must not be refused (or remembered) by the session's registry of ports handed out."""
    registry: set[int] = set()
    monkeypatch.setattr(conftest, "_HANDED_OUT", registry)
    yield registry


def test_a_repeated_draw_is_refused_while_the_first_socket_is_held(fresh_registry: set[int]) -> None:
    base = port_range().start
    a, b, c = base + 11, base + 22, base + 33
    kernel = FakeKernel()
    # the draws repeat a port that a helper closing each socket before the next draw would hand out twice
    ports = free_ports(3, rng=Scripted([a, a, b, a, b, c]), socket_factory=kernel.socket)  # type: ignore[arg-type]
    assert ports == [a, b, c]
    assert kernel.most_held == 3  # every socket stayed open until the third port was chosen ...
    assert kernel.held == set()  # ... and all are closed on return, so the servers can bind them


def test_a_port_is_never_handed_out_twice_in_a_session(fresh_registry: set[int]) -> None:
    base = port_range().start
    a, b = base + 5, base + 6
    kernel = FakeKernel()
    assert free_ports(1, rng=Scripted([a]), socket_factory=kernel.socket) == [a]  # type: ignore[arg-type]
    # a second component of the same test (its own call) cannot get `a`, though `a` is free again
    assert free_ports(1, rng=Scripted([a, a, b]), socket_factory=kernel.socket) == [b]  # type: ignore[arg-type]
    assert fresh_registry == {a, b}


def test_ray_default_ports_are_never_handed_out(fresh_registry: set[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "port_range", lambda: range(52000, 53000))
    kernel = FakeKernel()
    assert free_ports(1, rng=Scripted([52365, 52366]), socket_factory=kernel.socket) == [52366]  # type: ignore[arg-type]
    assert 52365 in RAY_DEFAULT_PORTS


def test_gives_up_with_a_clear_error_when_ports_run_out(fresh_registry: set[int]) -> None:
    base = port_range().start
    kernel = FakeKernel()
    kernel.held.add(base)  # another process holds the only port the draws ever offer
    with pytest.raises(RuntimeError, match="found only 0 of 1 free ports"):
        free_ports(1, rng=Scripted([base] * 10_000), socket_factory=kernel.socket)  # type: ignore[arg-type]
    assert kernel.held == {base}  # nothing of ours left open


def test_real_sockets_many_draws_of_eight() -> None:
    """With the real kernel: 40 calls of n=8 (320 ports) never repeat a port, every port is outside the ephemeral
    range and Ray's worker ports, and every one can be bound by a server right after the call."""
    seen: list[int] = []
    low = port_range()
    for _ in range(40):
        ports = free_ports(8)
        assert len(set(ports)) == 8
        for port in ports:
            assert port in low and port >= 20000 and port not in RAY_DEFAULT_PORTS
            with socket.socket() as s:  # what the server will do with it
                s.bind(("127.0.0.1", port))
        seen += ports
    assert len(set(seen)) == len(seen)


def test_real_sockets_skip_a_port_in_use(fresh_registry: set[int]) -> None:
    (target,) = free_ports(1)  # a port in our range that is free, then taken by another "process"
    fresh_registry.discard(target)
    with socket.socket() as busy:
        busy.bind(("", target))
        busy.listen(1)
        other = port_range().start + (target - port_range().start + 1) % len(port_range())
        ports = free_ports(1, rng=Scripted([target, target, other]))
    assert ports == [other]


def test_n_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        free_ports(0)
