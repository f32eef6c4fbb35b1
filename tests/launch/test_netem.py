"""Tests of the emulated multi-host network (distml.launch.netem).

The unit tests of units, validation and engine choice run anywhere; the rest
build real namespaces and skip, with the machine's reason, where that needs
root, iproute2, sch_tbf, sch_netem or /dev/net/tun. Every test that builds a
cluster checks that nothing named after it is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distml.errors import UserError
from distml.launch.netem import (
    EmulatedCluster,
    Support,
    cleanup_leftovers,
    list_namespaces,
    parse_delay,
    parse_rate,
    probe_support,
)

# A TCP peer for the probes below: `serve PORT` counts bytes per connection and
# answers with the count; `rtt HOST PORT N` prints the fastest of N connects;
# `send HOST PORT BYTES` prints how long sending BYTES took until acknowledged.
PEER = r"""
import json, socket, sys, time
mode = sys.argv[1]
if mode == "serve":
    srv = socket.create_server(("0.0.0.0", int(sys.argv[2])), backlog=64)
    while True:
        conn, _ = srv.accept()
        try:
            n = 0
            while chunk := conn.recv(1 << 16):
                n += len(chunk)
            conn.sendall(str(n).encode())
        except OSError:
            pass
        conn.close()

def connect(host, port):
    deadline = time.monotonic() + 20
    while True:
        try:
            return socket.create_connection((host, port), timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

host, port, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
connect(host, port).close()  # the server is up, and neighbour tables are warm
if mode == "rtt":
    times = []
    for _ in range(count):
        start = time.perf_counter()
        conn = connect(host, port)
        times.append(time.perf_counter() - start)
        conn.close()
    print(json.dumps({"min_connect_s": min(times)}))
else:
    conn = connect(host, port)
    start = time.perf_counter()
    conn.sendall(b"x" * count)
    conn.shutdown(socket.SHUT_WR)
    received = int(conn.recv(64))
    print(json.dumps({"seconds": time.perf_counter() - start, "received": received}))
"""

ALL_REDUCE = r"""
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
rank, world, master = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world)
value = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
dist.all_reduce(value)
print(value.tolist())
dist.destroy_process_group()
"""

CHILD = r"""
import sys, time
from distml.launch.netem import EmulatedCluster
with EmulatedCluster(2, rate="100mbit", engine=sys.argv[1]) as cluster:
    cluster.popen(1, ["sleep", "60"])
    print(cluster.prefix, flush=True)
    time.sleep(60)
"""


def require(engine: str = "auto", delay: float = 0.0) -> None:
    reason = probe_support().reason(engine, delay)
    if reason:
        pytest.skip(f"{engine} engine unavailable: {reason}")


def ours(prefix: str) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(prefix)]


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def peer(cluster: EmulatedCluster, host: int, *args: str) -> dict[str, float]:
    result = cluster.exec(host, [sys.executable, "-c", PEER, *args], timeout=60)
    assert result.ok, result.stderr
    return json.loads(result.stdout)


# --- anywhere ------------------------------------------------------------------


def test_parse_rate_units() -> None:
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1.5Gbit") == 1.5e9
    assert parse_rate("250kbit") == 250e3
    assert parse_rate("10mbps") == 80e6  # tc's bps units are bytes per second
    assert parse_rate(5e6) == 5e6
    assert parse_rate(None) is None
    assert parse_rate("0mbit") is None
    assert parse_rate("0") is None
    with pytest.raises(UserError) as err:
        parse_rate("100 megabits")
    assert str(err.value) == "rate '100 megabits' is not a rate; write e.g. '100mbit' or '1gbit'"


def test_parse_delay_units() -> None:
    assert parse_delay("1ms") == pytest.approx(1e-3)
    assert parse_delay("250us") == pytest.approx(250e-6)
    assert parse_delay("0.5s") == 0.5
    assert parse_delay(0.002) == 0.002
    assert parse_delay(None) == 0.0
    assert parse_delay("0") == 0.0
    with pytest.raises(UserError) as err:
        parse_delay("5")  # tc would read microseconds; a bare number is ambiguous
    assert str(err.value) == "delay '5' is not a duration; write e.g. '1ms' or '500us'"
    with pytest.raises(UserError) as err:
        parse_delay("1 minute")
    assert str(err.value) == "delay '1 minute' is not a duration; write e.g. '1ms' or '500us'"


def test_cluster_validates_arguments_and_names_hosts() -> None:
    with pytest.raises(UserError) as err:
        EmulatedCluster(hosts=7, subnet="10.9.0.0/29")
    assert (
        str(err.value)
        == "hosts=7 does not fit subnet 10.9.0.0/29; use 1 to 6 hosts or a larger subnet"
    )
    with pytest.raises(UserError) as err:
        EmulatedCluster(engine="ns3")
    assert str(err.value) == "unknown network engine 'ns3'; use one of auto, tc, userspace"
    cluster = EmulatedCluster(hosts=3, rate="1gbit", delay="2ms", subnet="10.9.0.0/24")
    assert [cluster.address(i) for i in range(3)] == ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
    assert cluster.master(29400) == "10.9.0.1:29400"
    assert cluster.namespace(2) == f"{cluster.prefix}h2"
    assert cluster.prefix.startswith(f"dm-{os.getpid()}-")
    assert (cluster.rate_bps, cluster.delay_s) == (1e9, 0.002)
    with pytest.raises(UserError) as err:
        cluster.address(3)
    assert str(err.value) == "host 3 does not exist; this cluster has hosts 0..2"


def test_engine_choice_follows_what_the_kernel_has() -> None:
    full = Support(namespaces="", tc="", netem="", tun="")
    no_netem = Support(namespaces="", tc="", netem="no netem", tun="")
    nothing = Support(namespaces="not root", tc="not root", netem="not root", tun="not root")
    assert full.engine_for("auto", 0.001) == "tc"
    assert no_netem.engine_for("auto", 0.0) == "tc"
    assert no_netem.engine_for("auto", 0.001) == "userspace"
    assert no_netem.reason("tc", 0.001) == "no netem"
    assert no_netem.reason("tc", 0.0) == ""
    assert no_netem.reason("auto", 0.001) == ""
    assert Support("", "no tbf", "no tbf", "no tun").reason("auto") == "no tbf; and no tun"
    assert nothing.reason("userspace") == "not root"


# --- real namespaces ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ["tc", "userspace"])
def test_teardown_leaves_nothing_after_a_failing_command(engine: str) -> None:
    require(engine)
    with EmulatedCluster(2, rate="100mbit", engine=engine) as cluster:
        assert sorted(ours(cluster.prefix)) == sorted(
            [cluster.namespace(0), cluster.namespace(1)]
            + ([f"{cluster.prefix}sw"] if engine == "tc" else [])
        )
        background = cluster.popen(1, ["sleep", "60"])
        result = cluster.exec(0, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert not result.ok and not result.timed_out
    assert ours(cluster.prefix) == []
    assert background.poll() is not None
    assert cluster.prefix not in root_links()
    assert f"dm{os.getpid() % 10**7}t" not in root_links()


@pytest.mark.timeout(60)
def test_timeouts_and_fail_fast_kill_commands() -> None:
    require()
    with EmulatedCluster(2) as cluster:
        start = time.monotonic()
        slow = cluster.exec(1, ["sleep", "30"], timeout=1.0)
        assert slow.timed_out and slow.returncode == -signal.SIGKILL
        assert 1.0 <= slow.elapsed_s < 5 and time.monotonic() - start < 8
        results = cluster.run_on_all(
            lambda i, _: ["sh", "-c", "exit 5"] if i == 0 else ["sleep", "30"],
            timeout=20,
            fail_fast=True,
        )
        assert [(r.host, r.returncode, r.timed_out) for r in results] == [
            (0, 5, False),
            (1, -signal.SIGKILL, False),
        ]
        assert results[1].elapsed_s < 5
    assert ours(cluster.prefix) == []


@pytest.mark.timeout(60)
def test_exception_inside_the_block_still_tears_down() -> None:
    require()
    with pytest.raises(RuntimeError, match="boom"), EmulatedCluster(2) as cluster:
        cluster.popen(0, ["sleep", "60"])
        raise RuntimeError("boom")
    assert ours(cluster.prefix) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)]
)
def test_signals_tear_down(sig: signal.Signals, code: int) -> None:
    require()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "tc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        prefix = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert prefix, proc.stderr.read()  # type: ignore[union-attr]
        assert len(ours(prefix)) == 3
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
    finally:
        proc.kill()
        proc.communicate()
    assert ours(prefix) == []


@pytest.mark.timeout(60)
def test_cleanup_leftovers_after_sigkill() -> None:
    require("userspace")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "userspace"], stdout=subprocess.PIPE, text=True
    )
    try:
        prefix = proc.stdout.readline().strip()  # type: ignore[union-attr]
        proc.kill()
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.communicate()
    left = ours(prefix)
    assert sorted(left) == [f"{prefix}h0", f"{prefix}h1"]
    # The switch notices its owner is gone and exits, which removes the TUN links.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        links = subprocess.run(
            ["ip", "-n", f"{prefix}h0", "-o", "link"], capture_output=True, text=True
        )
        if "eth0" not in links.stdout:
            break
        time.sleep(0.1)
    assert "eth0" not in links.stdout
    assert set(left) <= set(cleanup_leftovers())
    assert ours(prefix) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ["tc", "userspace"])
def test_delay_is_observable_in_the_round_trip(engine: str) -> None:
    delay = 0.010
    require(engine, delay)
    with EmulatedCluster(2, rate="100mbit", delay=delay, engine=engine) as cluster:
        cluster.popen(1, [sys.executable, "-c", PEER, "serve", "6000"])
        # A TCP connect is one round trip: SYN out, SYN-ACK back, each crossing one link delay.
        rtt = peer(cluster, 0, "rtt", cluster.address(1), "6000", "5")["min_connect_s"]
    assert 2 * delay <= rtt < 2 * delay + 0.03
    assert ours(cluster.prefix) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ["tc", "userspace"])
def test_rate_limit_is_observable_between_hosts(engine: str) -> None:
    require(engine)
    rate, nbytes = 20e6, 2_000_000
    with EmulatedCluster(2, rate=rate, engine=engine) as cluster:
        cluster.popen(1, [sys.executable, "-c", PEER, "serve", "6000"])
        got = peer(cluster, 0, "send", cluster.address(1), "6000", str(nbytes))
    ideal = nbytes * 8 / rate  # 0.8 s; headers make the real transfer a few percent slower
    assert got["received"] == nbytes
    assert 0.95 * ideal <= got["seconds"] < 3 * ideal + 1


@pytest.mark.timeout(60)
def test_processes_on_one_host_bypass_the_link() -> None:
    require()
    rate, nbytes = 10e6, 4_000_000  # 3.2 s if it crossed the link
    with EmulatedCluster(2, rate=rate) as cluster:
        cluster.popen(0, [sys.executable, "-c", PEER, "serve", "6000"])
        got = peer(cluster, 0, "send", "127.0.0.1", "6000", str(nbytes))
    assert got["received"] == nbytes
    assert got["seconds"] < 0.25 * nbytes * 8 / rate


@pytest.mark.timeout(120)
def test_gloo_all_reduce_across_emulated_hosts() -> None:
    require("auto", 0.001)
    with EmulatedCluster(2, rate="100mbit", delay="1ms") as cluster:
        results = cluster.run_on_all(
            lambda i, _: [sys.executable, "-c", ALL_REDUCE, str(i), "2", cluster.master(29500)],
            timeout=100,
            fail_fast=True,
        )
    for result in results:
        assert result.ok, result.stderr
        assert json.loads(result.stdout) == [3.0, 30.0]
    assert ours(cluster.prefix) == []


@pytest.mark.timeout(150)
def test_comm_bench_reports_bandwidth_within_the_link_rate(tmp_path: Path) -> None:
    require("auto", 0.001)
    out, rate, delay = tmp_path / "comm.json", 200e6, 0.001
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "comm_bench.py"
    argv = ["--rate", "200mbit", "--delay", "1ms", "--sizes-mb", "0.5", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["algorithm"] for r in rows} == {"torch", "ring", "halving_doubling", "tree"}
    assert all(r["correct"] for r in rows)
    # A bandwidth-optimal all-reduce moves 2(p-1)/p * n bytes per rank: never faster than the link.
    assert all(0 < r["link_utilization"] <= 1.05 for r in rows), rows
    fit = report["alpha_beta_fit"]
    assert fit["alpha_s"] >= 0.8 * delay  # every message crosses the one-way delay
    assert 0.5 <= fit["bandwidth_bps"] / rate <= 1.3
