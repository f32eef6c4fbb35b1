"""Emulated multi-host networks on one Linux machine, for testing and benchmarking distributed jobs.

:class:`EmulatedCluster` turns one root-privileged Linux box into ``hosts``
network namespaces ("hosts") on a private subnet (host ``i`` gets address
``i + 1`` of it, e.g. ``10.77.0.1``), joined through one emulated switch whose
links carry a rate limit and a one-way delay, and runs commands inside the
hosts (``ip netns exec``) with a timeout. Processes on the same host talk over
that namespace's loopback, so only inter-host traffic crosses a limited link.
Two engines build the links: ``tc`` (veth pairs on a bridge in a dedicated
switch namespace, ``tbf`` for the rate and ``netem`` for the delay) and
``userspace`` (a TUN device per host served by a small forwarding process that
models each link's queue, rate and delay), used where the kernel lacks
``sch_netem``. Everything created is named ``dm-<pid>-<n>-...`` and removed on
exit, exception, timeout, SIGINT/SIGTERM/SIGHUP and at interpreter exit;
:func:`cleanup_leftovers` removes what a killed run (SIGKILL) left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import heapq
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from distml.errors import DistmlError, UserError

PREFIX = "dm-"
INTERFACE = "eth0"  # the inter-host interface inside every host namespace
ENGINES = ("auto", "tc", "userspace")


class NetworkSetupError(DistmlError):
    """The machine refused to build or remove part of an emulated network."""


# --- units -------------------------------------------------------------------

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_RATE_UNITS.update({"bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9})  # tc: bytes/s
_DELAY_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_rate(rate: str | float | None) -> float | None:
    """Bits per second from a tc-style rate ("100mbit", "1gbit"; "bps" units are bytes/s as
    in tc) or a number of bits/s; ``None`` or zero means unlimited."""
    if rate is None or (isinstance(rate, (int, float)) and rate == 0):
        return None
    if isinstance(rate, (int, float)):
        value = float(rate)
    else:
        match = _NUMBER_UNIT.match(rate)
        unit = match.group(2).lower() if match else ""
        if match and not unit and float(match.group(1)) == 0:
            return None  # zero needs no unit
        if not match or unit not in _RATE_UNITS:
            raise UserError(f"rate {rate!r} is not a rate; write e.g. '100mbit' or '1gbit'")
        value = float(match.group(1)) * _RATE_UNITS[unit]
    if value < 0:
        raise UserError(f"rate {rate!r} is negative; give a positive rate such as '100mbit'")
    return value or None


def parse_delay(delay: str | float | None) -> float:
    """Seconds from a tc-style delay ("1ms", "250us", "0.1s") or a number of seconds."""
    if delay is None:
        return 0.0
    if isinstance(delay, (int, float)):
        value = float(delay)
    else:
        match = _NUMBER_UNIT.match(delay)
        unit = match.group(2).lower() if match else ""
        if match and not unit and float(match.group(1)) == 0:
            return 0.0  # zero needs no unit
        if not match or unit not in _DELAY_UNITS:
            raise UserError(f"delay {delay!r} is not a duration; write e.g. '1ms' or '500us'")
        value = float(match.group(1)) * _DELAY_UNITS[unit]
    if value < 0:
        raise UserError(f"delay {delay!r} is negative; give a duration such as '1ms'")
    return value


# --- shell helpers -------------------------------------------------------------


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkSetupError(f"{' '.join(argv)}: {exc}") from None
    if check and proc.returncode != 0:
        raise NetworkSetupError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _sh(command: str, *, check: bool = True) -> str:
    """Run an ``ip``/``tc`` command line; every word we pass is free of spaces."""
    return _run(command.split(), check=check)


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _kill_namespace_processes(namespace: str) -> None:
    # Every process inside one of our namespaces was started by us (or by our commands).
    for _ in range(50):
        pids = [int(p) for p in _run(["ip", "netns", "pids", namespace], check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    _sh(f"ip netns del {namespace}", check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers(prefix: str = PREFIX, *, include_live: bool = False) -> list[str]:
    """Delete namespaces named ``<prefix><pid>-...`` whose creating process is gone.

    With ``include_live`` every namespace under ``prefix`` goes, whoever made
    it. Processes still inside are killed first; links go with their
    namespace. Returns the names removed.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    owner = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    removed = []
    for name in list_namespaces():
        match = owner.match(name)
        if match and (include_live or not _pid_alive(int(match.group(1)))):
            _delete_namespace(name)
            removed.append(name)
    return removed


# --- what this machine supports ------------------------------------------------

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


def _open_tun(template: str) -> tuple[int, str]:
    """A new TUN device (the kernel fills ``%d`` in the name); it lives while the fd is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH22x", template.encode(), _IFF_TUN | _IFF_NO_PI)
        name = fcntl.ioctl(fd, _TUNSETIFF, request)[:16].split(b"\0", 1)[0].decode()
    except OSError:
        os.close(fd)
        raise
    return fd, name


@dataclass(frozen=True)
class Support:
    """What this machine can emulate; each field is ``""`` when usable, else why not."""

    namespaces: str
    tc: str
    netem: str
    tun: str

    def reason(self, engine: str = "auto", delay: float = 0.0) -> str:
        """Why a cluster with this engine and delay cannot be built here (``""`` if it can)."""
        if self.namespaces:
            return self.namespaces
        tc_reason = self.tc or (self.netem if delay > 0 else "")
        if engine == "tc":
            return tc_reason
        if engine == "userspace":
            return self.tun
        return "" if not tc_reason or not self.tun else f"{tc_reason}; and {self.tun}"

    def engine_for(self, engine: str, delay: float) -> str:
        """The engine ``auto`` resolves to: tc where the kernel can, else userspace."""
        if engine != "auto":
            return engine
        return "tc" if not self.tc and (delay == 0 or not self.netem) else "userspace"


_probe_lock = threading.Lock()


def probe_support() -> Support:
    """Try each building block once in a scratch namespace (cached for the process)."""
    with _probe_lock:
        return _probe_support()


@functools.lru_cache(maxsize=1)
def _probe_support() -> Support:
    if os.geteuid() != 0:
        reason = "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
        return Support(reason, reason, reason, reason)
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not found; install iproute2"
        return Support(reason, reason, reason, reason)
    scratch = f"{PREFIX}{os.getpid()}-probe"
    try:
        _sh(f"ip netns add {scratch}")
    except NetworkSetupError as exc:
        reason = f"cannot create network namespaces ({exc})"
        return Support(reason, reason, reason, reason)
    try:
        tc = netem = ""
        try:
            _sh(f"ip -n {scratch} link add name va type veth peer name vb")
            _sh(f"ip -n {scratch} link add br0 type bridge")
            _sh(f"tc -n {scratch} qdisc add dev va root tbf rate 100mbit burst 32kb latency 50ms")
        except NetworkSetupError as exc:
            tc = netem = f"kernel lacks veth, bridge or sch_tbf ({exc})"
        if not tc:
            try:
                _sh(f"tc -n {scratch} qdisc add dev vb root netem delay 1ms")
            except NetworkSetupError:
                netem = "kernel lacks sch_netem (CONFIG_NET_SCH_NETEM), so tc cannot add delay"
    finally:
        _delete_namespace(scratch)
    try:
        fd, _ = _open_tun(f"dmp{os.getpid() % 10**7}%d")
        os.close(fd)
        tun = ""
    except OSError as exc:
        tun = f"cannot create TUN devices through /dev/net/tun ({exc.strerror})"
    return Support("", tc, netem, tun)


# --- results -------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One command run on one host. ``returncode`` < 0 means killed by that signal."""

    host: int
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# --- teardown on signals and at exit ----------------------------------------------

_live: set[EmulatedCluster] = set()
_live_lock = threading.Lock()
_counter = itertools.count()
_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_installed: dict[int, Any] = {}


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # Unwinding as SystemExit runs every `with EmulatedCluster` block's teardown.
    raise SystemExit(128 + signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _EXIT_SIGNALS:
        if sig not in _installed and signal.getsignal(sig) is signal.SIG_DFL:
            _installed[sig] = signal.signal(sig, _exit_on_signal)


def _restore_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in list(_installed.items()):
        if signal.getsignal(sig) is _exit_on_signal:
            signal.signal(sig, previous)
        del _installed[sig]


@atexit.register
def _close_all() -> None:
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.close()


# --- the cluster -------------------------------------------------------------------


class EmulatedCluster:
    """``hosts`` network namespaces behind one switch with rate- and delay-limited links.

    Each host has one link to the switch, limited to ``rate`` in each
    direction; a packet between two hosts waits in the sender's uplink queue
    and the receiver's downlink queue and takes ``delay`` once (so a round
    trip takes at least ``2 * delay``). ``queue`` bounds each link's queue in
    time, like tc's ``tbf latency``: packets that would wait longer are
    dropped. Use it as a context manager; :meth:`close` is idempotent.
    """

    def __init__(
        self,
        hosts: int = 2,
        rate: str | float | None = None,
        delay: str | float | None = 0.0,
        *,
        subnet: str = "10.77.0.0/24",
        engine: str = "auto",
        queue: str | float = "50ms",
        mtu: int = 1500,
    ) -> None:
        try:
            self._network = ipaddress.IPv4Network(subnet)
        except ValueError:
            raise UserError(
                f"subnet {subnet!r} is not an IPv4 network; use e.g. 10.77.0.0/24"
            ) from None
        if not 1 <= hosts <= self._network.num_addresses - 2:
            raise UserError(
                f"hosts={hosts} does not fit subnet {subnet}; use 1 to "
                f"{self._network.num_addresses - 2} hosts or a larger subnet"
            )
        if engine not in ENGINES:
            raise UserError(f"unknown network engine {engine!r}; use one of {', '.join(ENGINES)}")
        if not 576 <= mtu <= 65000:
            raise UserError(f"mtu={mtu} is out of range; use 576 to 65000 (1500 is Ethernet)")
        self.hosts = hosts
        self.rate_bps = parse_rate(rate)
        self.delay_s = parse_delay(delay)
        self.queue_s = parse_delay(queue)
        if self.queue_s <= 0:
            raise UserError(f"queue={queue!r} must be a positive duration such as '50ms'")
        self.mtu = mtu
        self.requested_engine = engine
        self.engine = engine
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}-"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._switch: subprocess.Popen[bytes] | None = None
        self._switch_ctl: int | None = None
        self._tmp: str | None = None
        self._started = self._closed = False

    # -- naming ------------------------------------------------------------------

    def namespace(self, host: int) -> str:
        """The network namespace of ``host``."""
        self._check_host(host)
        return f"{self.prefix}h{host}"

    @property
    def switch_namespace(self) -> str | None:
        """The namespace holding the bridge (tc engine only)."""
        return f"{self.prefix}sw" if self.engine == "tc" else None

    def address(self, host: int) -> str:
        """IPv4 address of ``host`` on the emulated network (host 0 is the subnet's first)."""
        self._check_host(host)
        return str(self._network[host + 1])

    @property
    def interface(self) -> str:
        return INTERFACE

    def master(self, port: int = 29500) -> str:
        """``ADDR:PORT`` on host 0, for ``--master`` (each host has its own port space)."""
        return f"{self.address(0)}:{port}"

    def env(self, host: int) -> dict[str, str]:
        """Variables every command on ``host`` gets: collectives bind the emulated interface."""
        self._check_host(host)
        return {
            "GLOO_SOCKET_IFNAME": INTERFACE,
            "NCCL_SOCKET_IFNAME": INTERFACE,
            "TP_SOCKET_IFNAME": INTERFACE,
            "DISTML_EMULATED_HOST": str(host),
        }

    def _check_host(self, host: int) -> None:
        if not 0 <= host < self.hosts:
            raise UserError(
                f"host {host} does not exist; this cluster has hosts 0..{self.hosts - 1}"
            )

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetworkSetupError:
            if exc_type is None:
                raise  # otherwise the original error matters more than a teardown hiccup

    def start(self) -> None:
        """Build the namespaces and links; on any failure remove what was built."""
        if self._started:
            raise RuntimeError("an EmulatedCluster can be started once; create a new one")
        support = probe_support()
        reason = support.reason(self.engine, self.delay_s)
        if reason:
            raise NetworkSetupError(f"cannot emulate a network here: {reason}")
        self.engine = support.engine_for(self.engine, self.delay_s)
        self._started = True
        with _live_lock:
            _live.add(self)
        _install_signal_handlers()
        try:
            cleanup_leftovers()
            self._tmp = tempfile.mkdtemp(prefix=self.prefix)
            if self.engine == "tc":
                self._build_tc()
            else:
                self._build_userspace()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        self._namespaces.append(name)  # before creation, so a half-made one is removed too
        _sh(f"ip netns add {name}")
        _sh(f"ip -n {name} link set lo up")

    def _address_with_prefix(self, host: int) -> str:
        return f"{self.address(host)}/{self._network.prefixlen}"

    def _tbf(self, namespace: str, device: str, where: str) -> None:
        assert self.rate_bps is not None
        # A token bucket lets `burst` bytes through at wire speed; a real link serialises every
        # packet, so keep it near two frames (or 100 us of traffic at high rates).
        burst = max(2 * (self.mtu + 14), int(self.rate_bps / 8 * 1e-4))
        _sh(
            f"tc -n {namespace} qdisc add dev {device} {where} tbf rate {int(self.rate_bps)}bit "
            f"burst {burst} latency {int(self.queue_s * 1e6)}us"
        )

    def _build_tc(self) -> None:
        switch, mtu = f"{self.prefix}sw", self.mtu
        self._add_namespace(switch)
        _sh(f"ip -n {switch} link add br0 type bridge")
        _sh(f"ip -n {switch} link set br0 up")
        for host in range(self.hosts):
            ns, port = self.namespace(host), f"p{host}"
            self._add_namespace(ns)
            # Both ends are created directly in their namespaces: nothing appears in the root one.
            _sh(
                f"ip link add name {INTERFACE} netns {ns} mtu {mtu} "
                f"type veth peer name {port} netns {switch} mtu {mtu}"
            )
            _sh(f"ip -n {switch} link set {port} master br0 up")
            _sh(f"ip -n {ns} addr add {self._address_with_prefix(host)} dev {INTERFACE}")
            _sh(f"ip -n {ns} link set {INTERFACE} up")
            # Uplink (host egress) carries the one-way delay and the rate; downlink the rate.
            if self.delay_s > 0:
                backlog = (self.rate_bps or 1e10) / 8 * (self.delay_s + self.queue_s)
                _sh(
                    f"tc -n {ns} qdisc add dev {INTERFACE} root handle 1: netem "
                    f"delay {int(self.delay_s * 1e6)}us limit {1000 + int(backlog / 500)}"
                )
                if self.rate_bps:
                    self._tbf(ns, INTERFACE, "parent 1:1 handle 10:")
            elif self.rate_bps:
                self._tbf(ns, INTERFACE, "root")
            if self.rate_bps:
                self._tbf(switch, port, "root")

    def _build_userspace(self) -> None:
        fds: list[int] = []
        try:
            for host in range(self.hosts):
                ns = self.namespace(host)
                self._add_namespace(ns)
                fd, name = _open_tun(f"dm{os.getpid() % 10**7}t%d")
                fds.append(fd)
                _sh(f"ip link set {name} netns {ns}")
                _sh(f"ip -n {ns} link set {name} name {INTERFACE}")
                _sh(f"ip -n {ns} link set {INTERFACE} mtu {self.mtu} txqueuelen 1000 up")
                _sh(f"ip -n {ns} addr add {self._address_with_prefix(host)} dev {INTERFACE}")
            ctl_read, self._switch_ctl = os.pipe()
            spec = {
                "fds": fds,
                "ctl": ctl_read,
                "addresses": [self.address(h) for h in range(self.hosts)],
                "rate_bps": self.rate_bps,
                "delay_s": self.delay_s,
                "queue_s": self.queue_s,
            }
            package_root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
            assert self._tmp is not None
            with open(os.path.join(self._tmp, "switch.log"), "wb") as log:
                self._switch = subprocess.Popen(
                    [sys.executable, "-c", _SWITCH_BOOT, json.dumps(spec)],
                    pass_fds=[*fds, ctl_read],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    # Out of the terminal's process group: we, not Ctrl-C, stop it, in order.
                    start_new_session=True,
                )
            os.close(ctl_read)
        finally:
            for fd in fds:
                os.close(fd)  # the switch holds the only copies: the devices die with it
        assert self._switch.stdout is not None
        ready, _, _ = select.select([self._switch.stdout], [], [], 60.0)
        if not ready or self._switch.stdout.read(1) != b"R":
            raise NetworkSetupError(f"the userspace switch did not start: {self._switch_log()}")

    def _switch_log(self) -> str:
        if self._tmp is None:
            return ""
        path = os.path.join(self._tmp, "switch.log")
        text = Path(path).read_text(errors="replace") if os.path.exists(path) else ""
        return " | ".join(text.strip().splitlines()[-5:]) or "(no output)"

    def close(self) -> None:
        """Kill every process in the hosts, stop the switch and delete the namespaces."""
        if self._closed or not self._started:
            return
        self._closed = True
        # A second Ctrl-C or SIGTERM must not cut the teardown short; it is delivered after.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_EXIT_SIGNALS})
        try:
            for proc in self._procs:
                _kill_group(proc)
            for ns in self._namespaces:
                _kill_namespace_processes(ns)
            if self._switch_ctl is not None:
                os.close(self._switch_ctl)  # EOF tells the switch to exit
                self._switch_ctl = None
            if self._switch is not None:
                _stop(self._switch)
            for ns in reversed(self._namespaces):
                _sh(f"ip netns del {ns}", check=False)
            remaining = set(list_namespaces())
            left = [ns for ns in self._namespaces if ns in remaining]
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        finally:
            with _live_lock:
                _live.discard(self)
                if not _live:
                    _restore_signal_handlers()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if left:
            raise NetworkSetupError(f"could not delete namespaces {', '.join(left)}")

    # -- running commands ----------------------------------------------------------------

    def popen(
        self,
        host: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host`` in its own session; it is killed at teardown at the latest."""
        if not self._started or self._closed:
            raise RuntimeError(
                "the cluster is not running; use it inside `with EmulatedCluster(...)`"
            )
        full_env = {**os.environ, **self.env(host), **(env or {})}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(host), *argv],
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def exec(
        self,
        host: int,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Run ``argv`` on ``host`` and wait; killed (``timed_out``) after ``timeout`` seconds."""
        return self._run_many([(host, list(argv))], timeout, env, cwd, fail_fast=False)[0]

    def run_on_all(
        self,
        cmd_for_host: Callable[[int, str], Sequence[str]],
        *,
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        fail_fast: bool = False,
    ) -> list[Result]:
        """Run ``cmd_for_host(i, address(i))`` on every host at once; results by host.

        Commands still running after ``timeout`` seconds are killed and marked
        ``timed_out``. With ``fail_fast`` the first non-zero exit kills the
        other hosts' commands (their ``returncode`` is then ``-9``), which saves
        waiting out a rendezvous timeout when one node of a job crashes.
        """
        jobs = [(h, list(cmd_for_host(h, self.address(h)))) for h in range(self.hosts)]
        return self._run_many(jobs, timeout, env, cwd, fail_fast=fail_fast)

    def _run_many(
        self,
        jobs: Sequence[tuple[int, list[str]]],
        timeout: float,
        env: Mapping[str, str] | None,
        cwd: str | None,
        *,
        fail_fast: bool,
    ) -> list[Result]:
        with contextlib.ExitStack() as files:
            return self._run_and_collect(jobs, timeout, env, cwd, fail_fast, files)

    def _run_and_collect(
        self,
        jobs: Sequence[tuple[int, list[str]]],
        timeout: float,
        env: Mapping[str, str] | None,
        cwd: str | None,
        fail_fast: bool,
        files: contextlib.ExitStack,
    ) -> list[Result]:
        started = time.monotonic()
        outputs, procs = [], []
        for host, argv in jobs:
            # Files, not pipes: a chatty command can't block on a full pipe while we poll.
            out, err = _scratch_fd(self._tmp, files), _scratch_fd(self._tmp, files)
            outputs.append((out, err))
            procs.append(self.popen(host, argv, env=env, cwd=cwd, stdout=out, stderr=err))
        ends: list[float | None] = [None] * len(procs)
        timed_out = [False] * len(procs)
        deadline = started + timeout
        try:
            while any(end is None for end in ends):
                now = time.monotonic()
                failed = any(p.returncode not in (None, 0) for p in procs)
                for i, proc in enumerate(procs):
                    if ends[i] is not None:
                        continue
                    if proc.poll() is not None:
                        ends[i] = now
                    elif now >= deadline or (fail_fast and failed):
                        timed_out[i] = now >= deadline
                        _kill_group(proc)
                        ends[i] = now
                time.sleep(0.02)
        finally:
            for proc in procs:
                _kill_group(proc)
        results = []
        for (host, argv), proc, (out, err), end, late in zip(
            jobs, procs, outputs, ends, timed_out, strict=True
        ):
            texts = []
            for fd in (out, err):
                size = os.fstat(fd).st_size
                texts.append(os.pread(fd, size, 0).decode(errors="replace"))
            code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
            elapsed = (end or time.monotonic()) - started
            results.append(Result(host, tuple(argv), code, texts[0], texts[1], elapsed, late))
        if self._switch is not None and self._switch.poll() is not None:
            raise NetworkSetupError(f"the userspace switch died: {self._switch_log()}")
        return results


def _scratch_fd(folder: str | None, files: contextlib.ExitStack) -> int:
    """An unnamed read-write file in ``folder``, closed when ``files`` closes."""
    fd, path = tempfile.mkstemp(dir=folder)
    os.unlink(path)
    files.callback(os.close, fd)
    return fd


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Only while the leader is unreaped is its pid surely still our group's id.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


# --- the userspace switch (runs in its own process) ------------------------------------

_SWITCH_BOOT = "import sys; from distml.launch.netem import _switch_main; _switch_main(sys.argv[1])"


def _switch_main(spec_json: str) -> None:
    """Forward IPv4 packets between the hosts' TUN devices with each link's queue, rate, delay.

    A packet from host a to host b leaves a's uplink once the packets queued
    before it have been serialised at ``rate``, arrives at the switch
    ``delay`` later, then waits its turn on b's downlink. Times are computed
    on the schedule, not on when this loop happens to run, so a late wake-up
    does not stretch the next packet. A queue longer than ``queue_s`` drops.
    """
    spec = json.loads(spec_json)
    fds: list[int] = spec["fds"]
    ctl: int = spec["ctl"]
    route = {bytes(ipaddress.IPv4Address(a).packed): i for i, a in enumerate(spec["addresses"])}
    per_byte = 8.0 / spec["rate_bps"] if spec["rate_bps"] else 0.0
    delay, queue = float(spec["delay_s"]), float(spec["queue_s"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in fds:
        os.set_blocking(fd, False)
    host_of = {fd: i for i, fd in enumerate(fds)}
    uplink_free = [0.0] * len(fds)
    downlink_free = [0.0] * len(fds)
    events: list[tuple[float, int, bool, int, bytes]] = []  # (due, seq, delivered?, host, packet)
    seq = itertools.count()
    sys.stdout.buffer.write(b"R")
    sys.stdout.buffer.flush()
    while True:
        wait = max(0.0, events[0][0] - time.monotonic()) if events else 1.0
        # select() sleeps with microsecond resolution; epoll/poll would round up to 1 ms.
        ready, _, _ = select.select([ctl, *fds], [], [], wait)
        if ctl in ready:
            return  # the owner closed its end (or died)
        now = time.monotonic()
        for fd in ready:
            src = host_of[fd]
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                dst = route.get(packet[16:20]) if packet[:1] and packet[0] >> 4 == 4 else None
                if dst is None or dst == src:
                    continue
                start = max(now, uplink_free[src])
                if start - now > queue:
                    continue
                uplink_free[src] = start + len(packet) * per_byte
                heapq.heappush(events, (uplink_free[src] + delay, next(seq), False, dst, packet))
        now = time.monotonic()
        while events and events[0][0] <= now:
            due, _, delivered, dst, packet = heapq.heappop(events)
            if delivered:
                with contextlib.suppress(OSError):
                    os.write(fds[dst], packet)
                continue
            start = max(due, downlink_free[dst])
            if start - due > queue:
                continue
            downlink_free[dst] = start + len(packet) * per_byte
            heapq.heappush(events, (downlink_free[dst], next(seq), True, dst, packet))
