"""What secure aggregation costs a client and the server, against a plaintext round.

Run: make bench-secagg
     (or .venv/bin/python bench/secagg/cost.py [--quick] [--no-write])

For SecAgg+ with n in {10, 100, 1000} clients and d in {10**4, 10**6} words
(and full-graph SecAgg at n = 10 and 100 for d = 10**4), one protocol round
of :mod:`fedshield.secagg.protocol` is driven in this process exactly as
:func:`fedshield.simulation.secure.secure_sum` drives it: the server's
``requests()`` go to each client's ``handle()``, the replies back to the
server's ``receive()``, until ``result()``. The configuration is the one
``fedshield simulate`` builds from ``[secagg]``'s defaults: threshold
``ceil(2 n / 3)``, clip 1.0, 24 precision bits (modulus bits from
:func:`~fedshield.secagg.encoding.choose_encoding`), sigma = 40, 10 %
expected dropout, semi-honest server. Each client's update is ``d`` float32
values (normal, sd 0.05), encoded with
:func:`~fedshield.secagg.encoding.encode` right before its masked-input
request, as a client that has just trained would.

Measured for each configuration (compute is the CPU time of this process,
``time.process_time``, so that other work on a shared machine does not
inflate it; every step is single-threaded; wall-clock time is shown beside
it for the client):

client compute
    Per client: its ``encode`` + ``set_input`` and all its ``handle`` calls;
    the median over clients is reported (with the median masked-input stage).
client bytes
    Per client: the sum of its reply lengths (what it sends), against
    ``4 d`` (the float32 update in the clear, what a plaintext FedAvg client
    sends) and ``ceil(d b / 8)`` (the same encoded b-bit integers sent in
    the clear, packed to b bits as the protocol packs the masked vector).
    What it receives is shown too.
server compute
    The server's constructor (it derives the graph) plus every
    ``requests()``, ``receive()`` and ``result()``, against the plaintext
    server's work: turning each client's float32 bytes into an array and
    adding it to the sum, for the same n and d.
correctness
    ``result()`` equals the sum of the encoded inputs mod ``2**b``, and the
    decoded sum is within ``n / scale`` of the plain float sum.

The client at n = 1000 with d = 10**6 is measured in two parts (the table
says so; the server row below runs that configuration in full, at about
5 minutes): the full protocol at n = 1000 with d = 10**4 (every
client, every stage), and a second protocol instance at n = 1000 with
d = 10**6 whose first two stages (key advertisement and key sharing, which do
not depend on d) run for all 1000 clients, after which two samples of
clients encode their update and answer their real masked-input request
(``handle``: decrypting the shares, k pairwise masks and the self mask, each
d words of AES-CTR, and serialising the reply). Their masked inputs are not
sent on, so the round stops there: no server figures and no sum check for
those rows. A client's total is its own stages 0, 1 and 2 measured there
plus the median unmask-stage time and reply of the d = 10**4 run (that stage
sends shares only; it does not depend on d). The same is done once more with
threshold ``n / 2 + 1`` (k = 54 instead of 119), to show what the threshold
costs.

The allocator matters at d = 10**6: each pairwise mask allocates a few fresh
8 MB buffers, and whether glibc hands back pages that must be faulted in
again (cold) or reuses heap it already has (warm) changes the masked-input
stage two- to three-fold; glibc's adaptive thresholds choose one or the other
depending on the process's history. So the benchmark fixes them with
``mallopt`` (:func:`set_allocator`): the full runs run cold (the worst case,
and what a fresh client process sees), and the two samples of the
n = 1000, d = 10**6 rows are one cold and one warm.

The server at n = 1000, d = 10**6 (``server_row``; alone: ``--server 1000
1000000``). The server keeps one running sum of the masked inputs
(``SecAggServer.receive_one`` adds each as it arrives, O(d) memory), so it
can be measured there on the real protocol: every one of the 1000 clients
runs every stage for real, but the clients produce their masked inputs one
after another (each encodes its update right before its masked-input request
and drops it once its reply is sent), so that at most one client holds a
d-vector at a time. The server runs in a process of its own (``spawn``), fed
through a pipe one reply at a time, exactly what a network transport would
hand it; its compute is that process's CPU time inside the server's calls
(``requests``, ``receive_one``, ``end_stage``, ``result``; not the pipe),
and its peak memory that process's ``VmHWM`` (see :func:`rss_mib`),
beside the same figure taken before the server was built (the interpreter,
numpy and ``cryptography``). The clients' figures of that run (all 1000
clients, every stage, measured as above, cold allocator) are reported too.
``--batch`` hands the server each stage's replies at once (``receive``, as
:func:`~fedshield.simulation.secure.secure_sum` does), which also keeps every
reply of the stage alive; it works with a server that predates
``receive_one``, for before/after comparisons at smaller n.

``--unmask-micro N D`` (used by ``flower_secaggplus.py``) runs one full
SecAgg+ round at n = N, d = D and writes the server's unmask-stage
``receive`` time to ``.bench-peers/secagg/unmask-micro.json``.

Results: a table on stdout, ``.bench-peers/secagg/cost.json`` and the section
between the ``cost`` markers of ``bench/secagg/RESULTS.md``; the server row
goes to ``.bench-peers/secagg/server.json`` and the section between the
``cost-server`` markers (``--server`` rewrites only that one). Timings are
single runs on a shared machine (see the machine notes there).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedshield.secagg.encoding import (
    Encoding,
    add_mod,
    choose_encoding,
    decode_sum,
    encode,
)
from fedshield.secagg.graph import local_threshold
from fedshield.secagg.protocol import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
)
from fedshield.simulation.secure import SecureAggregation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / ".bench-peers" / "secagg"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- cost:begin -->", "<!-- cost:end -->"
SERVER_BEGIN, SERVER_END = "<!-- cost-server:begin -->", "<!-- cost-server:end -->"

SETTINGS = SecureAggregation()  # [secagg]'s defaults, as `fedshield simulate` has
SAMPLE = 5  # clients timed at n = 1000, d = 10**6
GOAL_CLIENT_S = 1.0
GOAL_BYTES_RATIO = 2.0
UPDATE_SD = 0.05

Protocol = Literal["secagg", "secagg+"]
Regime = Literal["cold", "warm"]

# glibc malloc: mallopt() parameters, and the two regimes the benchmark fixes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR: dict[str, tuple[int, int]] = {
    # Every buffer of 128 KiB or more is a fresh mapping whose pages fault in
    # on first touch (glibc's initial thresholds, their adaptation turned off).
    "cold": (128 * 1024, 128 * 1024),
    # Buffers up to 32 MiB come from the heap, which is never trimmed: freed
    # ones are reused without page faults.
    "warm": (32 << 20, 2**31 - 1),
}


def set_allocator(regime: Regime) -> bool:
    """Fix glibc malloc's mmap and trim thresholds; False where that is not possible.

    A masked input of ``d = 10**6`` allocates a few fresh 8 MB buffers per
    neighbour (keystream, mask, sum); whether their pages must be faulted in
    each time (cold) or are reused (warm) changes the stage's cost two- to
    three-fold, and glibc's adaptive thresholds pick one or the other
    depending on the process's history. The benchmark fixes the regime.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_threshold, trim_threshold = ALLOCATOR[regime]
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


@dataclass
class Measured:
    """One configuration's figures (see the module docstring)."""

    protocol: Protocol
    n: int
    d: int
    threshold: int
    k: int
    modulus_bits: int
    how: str
    clients_timed: int
    client_s: float  # median per-client total, CPU seconds
    client_wall_s: float  # the same in wall-clock seconds
    client_masked_s: float  # median masked-input stage (handle only)
    client_encode_s: float  # median encode + set_input
    sent_bytes: float  # median per client
    received_bytes: float  # median per client
    server_s: float | None
    plain_server_s: float | None
    sum_ok: bool | None
    wall_s: float
    stage_client_s: dict[str, float] = field(default_factory=dict)
    stage_sent_bytes: dict[str, float] = field(default_factory=dict)
    stage_received_bytes: dict[str, float] = field(default_factory=dict)
    stage_server_s: dict[str, float] = field(default_factory=dict)
    allocator: str = ""  # "cold" / "warm" where fixed (see set_allocator)

    @property
    def ratio_float32(self) -> float:
        """Bytes sent against the float32 update in the clear (``4 d``)."""
        return self.sent_bytes / (4 * self.d)

    @property
    def ratio_clear(self) -> float:
        """Bytes sent against the b-bit integers in the clear (``ceil(d b / 8)``)."""
        return self.sent_bytes / -(-self.d * self.modulus_bits // 8)


def client_ids(n: int) -> list[str]:
    return [f"client-{i:04d}" for i in range(n)]


def update_of(index: int, d: int, seed: int) -> npt.NDArray[np.float32]:
    """Client ``index``'s float32 update (its training is not timed)."""
    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(d, dtype=np.float32) * np.float32(UPDATE_SD)).astype(
        np.float32
    )


def configure(
    n: int, d: int, protocol: Protocol, threshold: int | None = None
) -> tuple[SecAggConfig, Any]:
    enc = choose_encoding(n, SETTINGS.clip, precision_bits=SETTINGS.precision_bits)
    t = SETTINGS.threshold_for(n) if threshold is None else threshold
    config = SecAggConfig(
        protocol=protocol,
        threshold=t,
        modulus_bits=enc.modulus_bits,
        vector_length=d,
        security_parameter=SETTINGS.security_parameter,
        expected_dropout=SETTINGS.expected_dropout,
    )
    return config, enc


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def tick() -> tuple[float, float]:
    """Start an interval: (CPU time of this process, wall time)."""
    return time.process_time(), time.perf_counter()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) since ``start``."""
    return time.process_time() - start[0], time.perf_counter() - start[1]


class _Clients:
    """The benchmark's client halves and what each one costs.

    :meth:`answer` is one client's turn in a stage: in the masked-input
    stage it first encodes the client's update (timed as encode), sends the
    same update in the clear to the plaintext round's server (timed as that
    server) and adds the encoded words to the reference sum; then it times
    the client's ``handle``.
    """

    def __init__(
        self,
        config: SecAggConfig,
        ids: list[str],
        enc: Encoding,
        d: int,
        rng: np.random.Generator,
        seed: int,
    ) -> None:
        # No retransmissions here: the halves keep no copy of their last reply
        # (n masked inputs would stay alive until the unmask stage).
        self.halves = {
            cid: SecAggClient(config, 0, cid, idempotent=False) for cid in ids
        }
        self.index = {cid: i for i, cid in enumerate(ids)}
        self.enc, self.d, self.rng, self.seed = enc, d, rng, seed
        self.client_s = dict.fromkeys(ids, 0.0)
        self.client_wall = dict.fromkeys(ids, 0.0)
        self.encode_s = dict.fromkeys(ids, 0.0)
        self.sent = dict.fromkeys(ids, 0)
        self.received = dict.fromkeys(ids, 0)
        self.plain_sum = np.zeros(d, dtype=np.float64)
        self.plain_server_s = 0.0
        self.int_sum = np.zeros(d, dtype=np.uint64)

    def answer(self, cid: str, message: bytes, *, masked: bool) -> tuple[bytes, float]:
        """The client's reply to ``message`` and its CPU time."""
        if masked:
            values = update_of(self.index[cid], self.d, self.seed)
            t0 = tick()
            words, _ = encode(values.astype(np.float64), self.enc, self.rng)
            self.halves[cid].set_input(words)
            self.encode_s[cid], wall = since(t0)
            self.client_wall[cid] += wall
            payload = values.tobytes()  # the plaintext round's message
            t0 = tick()
            np.add(
                self.plain_sum,
                np.frombuffer(payload, dtype=np.float32),
                out=self.plain_sum,
            )
            self.plain_server_s += since(t0)[0]
            self.int_sum = add_mod(self.int_sum, words, self.enc.modulus_bits)
            del values, words, payload
        t0 = tick()
        reply = self.halves[cid].handle(message)
        took, wall = since(t0)
        self.client_s[cid] += took
        self.client_wall[cid] += wall
        self.sent[cid] += len(reply)
        self.received[cid] += len(message)
        return reply, took


def full_round(n: int, d: int, protocol: Protocol, *, seed: int = 0) -> Measured:
    """Run the whole protocol for ``n`` clients and ``d`` words; time everything."""
    started = time.perf_counter()
    config, enc = configure(n, d, protocol)
    b = enc.modulus_bits
    ids = client_ids(n)
    stage_server: dict[str, float] = {}

    t0 = tick()
    server = SecAggServer(config, 0, ids)
    server_s = since(t0)[0]
    stage_server["setup"] = server_s
    stage_times: dict[str, list[float]] = {}
    stage_bytes: dict[str, list[float]] = {}
    stage_received: dict[str, list[float]] = {}
    rng = np.random.default_rng([seed, n, d])
    clients = _Clients(config, ids, enc, d, rng, seed)

    while server.stage not in (Stage.DONE, Stage.ABORTED):
        stage = str(server.stage)
        t0 = tick()
        requests = server.requests()
        spent = since(t0)[0]
        replies: dict[str, bytes] = {}
        times: list[float] = []
        for cid in ids:
            message = requests.get(cid)
            if message is None:
                continue
            reply, took = clients.answer(
                cid, message, masked=server.stage is Stage.MASKED_INPUT
            )
            times.append(took)
            replies[cid] = reply
            stage_bytes.setdefault(stage, []).append(len(reply))
            stage_received.setdefault(stage, []).append(len(message))
        stage_times[stage] = times
        del requests
        t0 = tick()
        server.receive(replies)
        spent += since(t0)[0]
        stage_server[stage] = spent
        server_s += spent
        del replies

    t0 = tick()
    total = server.result()
    spent = since(t0)[0]
    server_s += spent
    stage_server["result"] = spent
    sum_ok = bool(np.array_equal(total, clients.int_sum))
    decoded = decode_sum(total, enc, len(server.survivors))
    sum_ok = sum_ok and bool(
        np.max(np.abs(decoded - clients.plain_sum)) <= n / enc.scale + 1e-9
    )
    totals = [clients.client_s[c] + clients.encode_s[c] for c in ids]
    return Measured(
        protocol=protocol,
        n=n,
        d=d,
        threshold=config.threshold,
        k=server.neighbours,
        modulus_bits=b,
        how="full protocol, every client timed",
        clients_timed=n,
        client_s=median(totals),
        client_wall_s=median(list(clients.client_wall.values())),
        client_masked_s=median(stage_times.get(str(Stage.MASKED_INPUT), [])),
        client_encode_s=median(list(clients.encode_s.values())),
        sent_bytes=median([float(v) for v in clients.sent.values()]),
        received_bytes=median([float(v) for v in clients.received.values()]),
        server_s=server_s,
        plain_server_s=clients.plain_server_s,
        sum_ok=sum_ok,
        wall_s=time.perf_counter() - started,
        stage_client_s={s: median(v) for s, v in stage_times.items()},
        stage_sent_bytes={s: median(v) for s, v in stage_bytes.items()},
        stage_received_bytes={s: median(v) for s, v in stage_received.items()},
        stage_server_s=stage_server,
    )


def masked_stage_sample(
    n: int,
    d: int,
    reference: Measured,
    *,
    sample: int = SAMPLE,
    threshold: int | None = None,
    seed: int = 0,
    regimes: tuple[Regime, ...] = ("cold", "warm"),
) -> list[Measured]:
    """Stages 0-1 for all ``n`` clients, then the masked-input stage of samples.

    One sample of ``sample`` clients per allocator regime (other clients for
    each; the regime is left at the last one). ``reference`` is a full run at
    the same ``n`` (smaller ``d``): its median unmask-stage time and reply are
    added to each sampled client's total.
    """
    started = time.perf_counter()
    config, enc = configure(n, d, "secagg+", threshold)
    ids = client_ids(n)
    server = SecAggServer(config, 0, ids)
    clients = {cid: SecAggClient(config, 0, cid, idempotent=False) for cid in ids}
    client_s = dict.fromkeys(ids, 0.0)
    client_wall = dict.fromkeys(ids, 0.0)
    sent = dict.fromkeys(ids, 0)
    received = dict.fromkeys(ids, 0)
    stage_times: dict[str, list[float]] = {}
    stage_bytes: dict[str, list[float]] = {}
    for _ in range(2):  # advertise_keys, share_keys: all clients
        stage = str(server.stage)
        replies: dict[str, bytes] = {}
        for cid, message in server.requests().items():
            t0 = tick()
            reply = clients[cid].handle(message)
            took, wall = since(t0)
            client_s[cid] += took
            client_wall[cid] += wall
            stage_times.setdefault(stage, []).append(took)
            stage_bytes.setdefault(stage, []).append(len(reply))
            sent[cid] += len(reply)
            received[cid] += len(message)
            replies[cid] = reply
        server.receive(replies)
    assert server.stage is Stage.MASKED_INPUT
    requests = server.requests()
    step = max(1, n // (sample * len(regimes)))
    unmask = str(Stage.UNMASK)
    unmask_s = reference.stage_client_s[unmask]
    unmask_bytes = reference.stage_sent_bytes[unmask]
    unmask_asked = reference.stage_received_bytes[unmask]
    rng = np.random.default_rng([seed, n, d])
    out = []
    for r, regime in enumerate(regimes):
        controlled = set_allocator(regime)
        chosen = [ids[i] for i in range(r, n, step)][:sample]
        totals, walls, masked, encodes = [], [], [], []
        sent_totals, received_totals, masked_bytes = [], [], []
        for cid in chosen:
            values = update_of(ids.index(cid), d, seed).astype(np.float64)
            t0 = tick()
            words, _ = encode(values, enc, rng)
            clients[cid].set_input(words)
            encode_took, encode_wall = since(t0)
            del values, words
            t0 = tick()
            reply = clients[cid].handle(requests[cid])
            took, wall = since(t0)
            masked.append(took)
            encodes.append(encode_took)
            masked_bytes.append(float(len(reply)))
            totals.append(client_s[cid] + encode_took + took + unmask_s)
            walls.append(client_wall[cid] + encode_wall + wall + unmask_s)
            sent_totals.append(sent[cid] + len(reply) + unmask_bytes)
            received_totals.append(received[cid] + len(requests[cid]) + unmask_asked)
            del reply
        stage_client = {s: median(v) for s, v in stage_times.items()}
        stage_client[str(Stage.MASKED_INPUT)] = median(masked)
        stage_client[unmask] = unmask_s
        stage_sent = {s: median(v) for s, v in stage_bytes.items()}
        stage_sent[str(Stage.MASKED_INPUT)] = median(masked_bytes)
        stage_sent[unmask] = unmask_bytes
        allocator = f"{regime} allocator" if controlled else "allocator not fixed"
        out.append(
            Measured(
                protocol="secagg+",
                n=n,
                d=d,
                threshold=config.threshold,
                k=server.neighbours,
                modulus_bits=enc.modulus_bits,
                how=(
                    f"stages 0-1 all {n} clients; masked input of {len(chosen)} "
                    f"sampled clients, {allocator}; unmask stage from the "
                    f"d={reference.d:,} run"
                ),
                clients_timed=len(chosen),
                client_s=median(totals),
                client_wall_s=median(walls),
                client_masked_s=median(masked),
                client_encode_s=median(encodes),
                sent_bytes=median(sent_totals),
                received_bytes=median(received_totals),
                server_s=None,
                plain_server_s=None,
                sum_ok=None,
                wall_s=time.perf_counter() - started,
                stage_client_s=stage_client,
                stage_sent_bytes=stage_sent,
                allocator=regime if controlled else "",
            )
        )
    return out


@dataclass
class ServerMeasured:
    """The server at large n and d, on a real protocol run (see the docstring)."""

    protocol: Protocol
    n: int
    d: int
    threshold: int
    k: int
    modulus_bits: int
    mode: str  # "streaming" (receive_one) or "batch" (receive)
    server_s: float  # CPU seconds of the server's calls, in its own process
    stage_server_s: dict[str, float]
    server_peak_mib: float  # peak resident set (rss_mib) of the server process
    server_baseline_mib: float  # the same before the server was built
    stage_peak_mib: dict[str, float]  # the same after each stage
    plain_server_s: float
    sum_ok: bool
    survivors: int
    client_s: float  # median over all clients, CPU (encode + every handle)
    client_wall_s: float
    client_masked_s: float
    client_encode_s: float
    sent_bytes: float
    wall_s: float
    how: str


def rss_mib() -> float:
    """This process's peak resident set so far, MiB.

    ``VmHWM`` from ``/proc/self/status`` where there is one: the high-water
    mark of this process image. ``ru_maxrss`` is not used there because
    Linux carries it over ``fork`` + ``exec``, so a server process spawned
    by a large benchmark process would report its parent's size (1.4 GiB
    in one full run). Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _server_process(conn: Connection, n: int, d: int, batch: bool) -> None:
    """The server's side of :func:`server_row`, in a process of its own.

    Sends each stage's requests, takes the replies one message at a time
    (``("reply", id, bytes)`` ... ``("end",)``) and hands each to
    ``receive_one`` at once (or, with ``batch``, all to ``receive`` at the
    end of the stage); times only the server's own calls.
    """
    baseline = rss_mib()
    config, _ = configure(n, d, "secagg+")
    cpu: dict[str, float] = {}
    peaks: dict[str, float] = {}
    start = time.process_time()
    server = SecAggServer(config, 0, client_ids(n))
    cpu["setup"] = time.process_time() - start
    try:
        while server.stage not in (Stage.DONE, Stage.ABORTED):
            stage = str(server.stage)
            start = time.process_time()
            requests = server.requests()
            spent = time.process_time() - start
            conn.send((stage, requests))
            del requests
            pending: dict[str, bytes] = {}
            while True:
                item = conn.recv()
                if item[0] == "end":
                    break
                _, cid, data = item
                del item
                if batch:
                    pending[cid] = data
                else:
                    start = time.process_time()
                    server.receive_one(cid, data)
                    spent += time.process_time() - start
                del data
            start = time.process_time()
            if batch:
                server.receive(pending)
            else:
                server.end_stage()
            spent += time.process_time() - start
            del pending
            cpu[stage] = spent
            peaks[stage] = rss_mib()
        start = time.process_time()
        total = server.result()
        cpu["result"] = time.process_time() - start
    except Exception as exc:  # reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(
        (
            "done",
            {
                "result": total.tobytes(),
                "cpu": cpu,
                "baseline_mib": baseline,
                "peak_mib": rss_mib(),
                "stage_peak_mib": peaks,
                "survivors": len(server.survivors),
                "k": server.neighbours,
            },
        )
    )


def server_row(n: int, d: int, *, batch: bool = False, seed: int = 0) -> ServerMeasured:
    """The real protocol for ``n`` clients and ``d`` words, the server streaming.

    The clients run here, one after another within each stage; the server
    runs in a spawned process (see :func:`_server_process`).
    """
    started = time.perf_counter()
    config, enc = configure(n, d, "secagg+")
    b = enc.modulus_bits
    ids = client_ids(n)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_server_process, args=(theirs, n, d, batch))
    child.start()
    theirs.close()
    masked_s: list[float] = []
    rng = np.random.default_rng([seed, n, d])
    clients = _Clients(config, ids, enc, d, rng, seed)
    try:
        while True:
            item = ours.recv()
            if item[0] in ("done", "error"):
                break
            stage, requests = item
            del item
            log(f"    stage {stage}: {len(requests)} clients")
            masked = stage == str(Stage.MASKED_INPUT)
            for cid in ids:
                message = requests.get(cid)
                if message is None:
                    continue
                reply, took = clients.answer(cid, message, masked=masked)
                if masked:
                    masked_s.append(took)
                ours.send(("reply", cid, reply))
                del reply
            ours.send(("end",))
            del requests
    finally:
        child.join(timeout=600)
    if item[0] == "error":
        raise RuntimeError(f"the server failed: {item[1]}")
    report = item[1]
    total = np.frombuffer(report["result"], dtype=np.uint64)
    sum_ok = bool(np.array_equal(total, clients.int_sum))
    decoded = decode_sum(total, enc, report["survivors"])
    sum_ok = sum_ok and bool(
        np.max(np.abs(decoded - clients.plain_sum)) <= n / enc.scale + 1e-9
    )
    cpu: dict[str, float] = report["cpu"]
    mode = "batch" if batch else "streaming"
    how = (
        f"full protocol, all {n} clients, every stage; server in its own process, "
        + (
            "each stage's replies at once (receive)"
            if batch
            else "each reply as it arrives (receive_one)"
        )
        + "; clients one at a time, cold allocator"
    )
    return ServerMeasured(
        protocol="secagg+",
        n=n,
        d=d,
        threshold=config.threshold,
        k=report["k"],
        modulus_bits=b,
        mode=mode,
        server_s=sum(cpu.values()),
        stage_server_s=cpu,
        server_peak_mib=report["peak_mib"],
        server_baseline_mib=report["baseline_mib"],
        stage_peak_mib=report["stage_peak_mib"],
        plain_server_s=clients.plain_server_s,
        sum_ok=sum_ok,
        survivors=report["survivors"],
        client_s=median([clients.client_s[c] + clients.encode_s[c] for c in ids]),
        client_wall_s=median(list(clients.client_wall.values())),
        client_masked_s=median(masked_s),
        client_encode_s=median(list(clients.encode_s.values())),
        sent_bytes=median([float(v) for v in clients.sent.values()]),
        wall_s=time.perf_counter() - started,
        how=how,
    )


# ---------------------------------------------------------------- reporting


def machine_notes() -> str:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cryptography

    return (
        f"{os.cpu_count()} cores ({model or 'unknown CPU'}), shared with other "
        f"work, so timings are noisy (single runs); Python "
        f"{platform.python_version()}, numpy {np.__version__}, cryptography "
        f"{cryptography.__version__}"
    )


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.2f} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def size(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} MB"
    if value >= 1e3:
        return f"{value / 1e3:.1f} kB"
    return f"{value:.0f} B"


def table(rows: list[Measured]) -> list[str]:
    lines = [
        "| protocol | n | d | t | k | b | client compute (median, CPU) | (wall) "
        "| of which encode / masked input | client sends | / float32 (4d) "
        "| / b-bit ints (db/8) | client receives | server compute "
        "| plaintext server | server ratio | sum check | how measured |",
        "|---|" + "---:|" * 15 + "---|---|",
    ]
    for m in rows:
        ratio = (
            f"{m.server_s / m.plain_server_s:,.0f}x"
            if m.server_s is not None and m.plain_server_s
            else "-"
        )
        check = "-" if m.sum_ok is None else ("ok" if m.sum_ok else "**WRONG**")
        lines.append(
            f"| {m.protocol} | {m.n:,} | {m.d:,} | {m.threshold} | {m.k} "
            f"| {m.modulus_bits} | {seconds(m.client_s)} | {seconds(m.client_wall_s)} "
            f"| {seconds(m.client_encode_s)} / {seconds(m.client_masked_s)} "
            f"| {size(m.sent_bytes)} | {m.ratio_float32:.2f}x "
            f"| {m.ratio_clear:.2f}x | {size(m.received_bytes)} "
            f"| {seconds(m.server_s)} | {seconds(m.plain_server_s)} | {ratio} "
            f"| {check} | {m.how} |"
        )
    return lines


def stage_table(rows: list[Measured]) -> list[str]:
    stages = [str(s) for s in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)]
    stages += [str(Stage.MASKED_INPUT), str(Stage.UNMASK)]
    head = " | ".join(f"{s} (time / sent)" for s in stages)
    lines = [
        f"| protocol | n | d | k | {head} | server per stage |",
        "|---|---:|---:|---:|" + "---:|" * len(stages) + "---|",
    ]
    for m in rows:
        cells = [
            f"{seconds(m.stage_client_s.get(s))} / "
            f"{size(m.stage_sent_bytes.get(s, 0.0))}"
            for s in stages
        ]
        server = (
            ", ".join(f"{s}: {seconds(v)}" for s, v in m.stage_server_s.items()) or "-"
        )
        lines.append(
            f"| {m.protocol} | {m.n:,} | {m.d:,} | {m.k} | "
            + " | ".join(cells)
            + f" | {server} |"
        )
    return lines


def goals(rows: list[Measured]) -> list[str]:
    lines = ["Goals:", ""]
    big = [m for m in rows if m.n == 1000 and m.d == 10**6]
    if big:
        default_t = SETTINGS.threshold_for(1000)
        verdicts = [m.client_s < GOAL_CLIENT_S for m in big if m.threshold == default_t]
        if verdicts and all(verdicts):
            met = "met"
        elif any(verdicts):
            met = "**met only with a warm allocator**"
        else:
            met = "**not met**"
        lines.append(
            f"- Client compute for d = 10^6 at n = 1,000 under {GOAL_CLIENT_S:.0f} s "
            f"(default threshold t = {default_t}): {met}. Median over the "
            "sampled clients, CPU time (wall-clock in brackets):"
        )
        for m in big:
            lines.append(
                f"  - t = {m.threshold}, k = {m.k}, "
                f"{m.allocator or 'allocator not fixed'}: {seconds(m.client_s)} "
                f"({seconds(m.client_wall_s)}), of which masked-input stage "
                f"{seconds(m.client_masked_s)} "
                f"({m.client_masked_s / m.k * 1000:.1f} ms per neighbour) and "
                f"encoding {seconds(m.client_encode_s)}: "
                f"{'met' if m.client_s < GOAL_CLIENT_S else 'not met'}"
            )
    default_t = SETTINGS.threshold_for(1000)
    at_1000 = list(
        {m.d: m for m in rows if m.n == 1000 and m.threshold == default_t}.values()
    )
    if at_1000:
        worst = max(m.ratio_float32 for m in at_1000)
        met = "met" if worst <= GOAL_BYTES_RATIO else "**not met**"
        parts = ", ".join(
            f"d = {m.d:,}: {m.ratio_float32:.2f}x float32 / "
            f"{m.ratio_clear:.2f}x b-bit integers"
            for m in at_1000
        )
        by_words = ", ".join(
            f"d = {m.d:,}: {'met' if m.ratio_clear <= GOAL_BYTES_RATIO else 'not met'}"
            for m in at_1000
        )
        ref = at_1000[0]
        per_neighbour = ref.stage_sent_bytes.get(str(Stage.SHARE_KEYS), 0.0) / ref.k
        lines.append(
            f"- Communication <= {GOAL_BYTES_RATIO:.0f}x plaintext at n = 1,000: "
            f"{met} against the float32 update ({parts}). Against the same "
            f"b-bit integers sent in the clear: {by_words}. What is sent besides "
            f"the masked vector does not grow with d (share_keys: about "
            f"{per_neighbour:.0f} bytes per neighbour, k = {ref.k}), so it "
            "weighs most at small d."
        )
    return lines


def wire_note(rows: list[Measured]) -> list[str]:
    """What the masked vector costs on the wire, per word, against Bonawitz et al."""
    notes = []
    for m in rows:
        masked = m.stage_sent_bytes.get(str(Stage.MASKED_INPUT))
        if masked and m.d == max(r.d for r in rows) and m.n == max(r.n for r in rows):
            notes.append(
                f"{masked / m.d:.2f} bytes per word at n = {m.n:,}, d = {m.d:,} "
                f"(b = {m.modulus_bits}: {m.modulus_bits / 8:.2f} bytes of "
                f"information per word; {masked / (4 * m.d):.2f}x a float32 "
                "update)"
            )
    masked_text = "; ".join(dict.fromkeys(notes)) or "not measured"
    return [
        "Bonawitz et al. (CCS 2017) report a 1.73x expansion over sending the "
        "data in the clear for 2^10 users and 2^20-dimensional vectors: their "
        "masked vector has the bit width of the input, so the expansion is the "
        "keys and shares. Here the masked-input reply alone takes "
        f"{masked_text}; the rest of what a client sends is about one "
        "encrypted share pair per neighbour (share_keys), its public keys, and "
        "the shares it returns when unmasking (see the per-stage table)."
    ]


def render(rows: list[Measured], command: str) -> str:
    lines = [
        BEGIN,
        "## Cost per client and for the server (`cost.py`)",
        "",
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}. Machine: "
        f"{machine_notes()}.",
        "",
        "Configuration as `fedshield simulate` builds it from `[secagg]`'s "
        "defaults: threshold t = ceil(2n/3), clip 1.0, 24 precision bits "
        "(b = modulus bits), sigma = 40, 10 % expected dropout (k chosen by "
        "`choose_neighbours`), semi-honest server, no dropouts. Compute is CPU "
        "time of the benchmark process (`time.process_time`; every step is "
        "single-threaded), so that other work on the shared machine does not "
        "inflate it; the client's wall-clock time is shown beside it. Client "
        "compute = its `encode` + `set_input` + all its `handle` calls (training "
        "excluded), median over clients. Client sends = sum of its reply "
        "lengths (the bytes `handle()` returns: the protocol's wire messages, "
        "`fedshield.secagg.messages`). Server compute = "
        "constructor + all `requests`/`receive`/`result`; plaintext server = "
        "`np.frombuffer` + add of each client's float32 bytes. Sum check: "
        "`result()` equals the sum of the encoded inputs mod 2^b and decodes to "
        "within n/scale of the float sum.",
        "",
        *table(rows),
        "",
        "Per stage (median client time / median reply size; server time per stage):",
        "",
        *stage_table(rows),
        "",
        *goals(rows),
        "",
        *wire_note(rows),
        END,
    ]
    return "\n".join(lines)


def render_server(rows: list[ServerMeasured], command: str) -> str:
    lines = [
        SERVER_BEGIN,
        "## The server on a real protocol run, large n and d (`cost.py --server`)",
        "",
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}. Machine: "
        f"{machine_notes()}.",
        "",
        "The real protocol, configured as above (SecAgg+, semi-honest, no "
        "dropouts): all n clients run every stage, one after another (each "
        "encodes its update right before its masked-input request, so one "
        "d-vector is alive on the client side at a time). The server runs in a "
        "process of its own and gets the replies through a pipe, one at a "
        "time. Server compute is that process's CPU time inside the server's "
        "calls (not the pipe); peak memory is its `VmHWM` high-water mark, "
        "and *baseline* "
        "the same before the server was built (interpreter, numpy, "
        "`cryptography`). Plaintext server: `np.frombuffer` + add of each "
        "client's float32 bytes. Client figures: medians over all n clients "
        "(CPU; encode + every `handle`).",
        "",
        "| protocol | n | d | t | k | b | server input | server compute (CPU) "
        "| server peak memory | baseline | plaintext server | server ratio "
        "| client compute (median) | of which encode / masked input "
        "| client sends | sum check | wall | how measured |",
        "|---|" + "---:|" * 5 + "---|" + "---:|" * 10 + "---|",
    ]
    for m in rows:
        check = "ok" if m.sum_ok else "**WRONG**"
        lines.append(
            f"| {m.protocol} | {m.n:,} | {m.d:,} | {m.threshold} | {m.k} "
            f"| {m.modulus_bits} | {m.mode} | {seconds(m.server_s)} "
            f"| {m.server_peak_mib:,.0f} MiB | {m.server_baseline_mib:,.0f} MiB "
            f"| {seconds(m.plain_server_s)} "
            f"| {m.server_s / m.plain_server_s:,.0f}x "
            f"| {seconds(m.client_s)} | {seconds(m.client_encode_s)} / "
            f"{seconds(m.client_masked_s)} | {size(m.sent_bytes)} | {check} "
            f"| {m.wall_s:.0f} s | {m.how} |"
        )
    lines += ["", "Server per stage (CPU; peak memory after the stage):", ""]
    for m in rows:
        parts = ", ".join(
            f"{stage}: {seconds(m.stage_server_s[stage])}"
            + (
                f" ({m.stage_peak_mib[stage]:,.0f} MiB)"
                if stage in m.stage_peak_mib
                else ""
            )
            for stage in m.stage_server_s
        )
        lines.append(f"- n = {m.n:,}, d = {m.d:,}, {m.mode}: {parts}")
    lines.append(SERVER_END)
    return "\n".join(lines)


def write_section(text: str, begin: str = BEGIN, end: str = END) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else "# Secure aggregation\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        _, after = rest.split(end, 1)
        updated = head + text + after
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(updated)


def run_server_rows(
    plan: list[tuple[int, int]], *, batch: bool, write: bool, command: str
) -> bool:
    """Measure the server rows of ``plan`` and report them; False if a sum is wrong."""
    set_allocator("cold")
    rows = []
    for n, d in plan:
        log(f"server row: secagg+ n={n} d={d:,} ({'batch' if batch else 'streaming'})")
        m = server_row(n, d, batch=batch)
        log(
            f"    server {seconds(m.server_s)}, peak {m.server_peak_mib:,.0f} MiB "
            f"(baseline {m.server_baseline_mib:,.0f} MiB), client "
            f"{seconds(m.client_s)}, sum {'ok' if m.sum_ok else 'WRONG'}, "
            f"wall {m.wall_s:.0f} s"
        )
        rows.append(m)
    text = render_server(rows, command)
    print(text)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "server.json").write_text(json.dumps([asdict(m) for m in rows], indent=1))
    if write:
        write_section(text, SERVER_BEGIN, SERVER_END)
    return all(m.sum_ok for m in rows)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unmask_micro(n: int, d: int) -> int:
    """One full SecAgg+ round; write the server's unmask ``receive`` time."""
    m = full_round(n, d, "secagg+")
    if not m.sum_ok:
        log("unmask micro-benchmark: wrong sum")
        return 1
    config, _ = configure(n, d, "secagg+")
    k = config.neighbour_count(n)
    local = local_threshold(k + 1, config.threshold, n)  # at the expected degree
    out = {
        "n": n,
        "d": d,
        "neighbours": k,
        "local_threshold": local,
        "unmask_receive_s": m.stage_server_s[str(Stage.UNMASK)],
    }
    WORK.mkdir(exist_ok=True)
    (WORK / "unmask-micro.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="d = 10**4 only, n up to 100"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not update RESULTS.md"
    )
    parser.add_argument(
        "--unmask-micro", nargs=2, type=int, metavar=("N", "D"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--server",
        nargs=2,
        type=int,
        metavar=("N", "D"),
        help="only the server row, at n = N and d = D (the full run: 1000 1000000)",
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="server row: hand the server each stage's replies at once (receive)",
    )
    args = parser.parse_args(argv)
    if args.unmask_micro:
        return unmask_micro(*args.unmask_micro)
    command = ".venv/bin/python bench/secagg/cost.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
    )
    if args.server:
        ok = run_server_rows(
            [tuple(args.server)],
            batch=args.batch,
            write=not args.no_write,
            command=command,
        )
        return 0 if ok else 1
    started = time.perf_counter()
    controlled = set_allocator("cold")
    plan: list[tuple[Protocol, int, int]] = [
        ("secagg+", 10, 10**4),
        ("secagg+", 100, 10**4),
        ("secagg", 10, 10**4),
        ("secagg", 100, 10**4),
    ]
    if not args.quick:
        plan += [
            ("secagg+", 10, 10**6),
            ("secagg+", 100, 10**6),
            ("secagg+", 1000, 10**4),
        ]
    rows: list[Measured] = []
    for protocol, n, d in plan:
        log(f"{protocol} n={n} d={d:,} ...")
        m = full_round(n, d, protocol)
        if controlled:
            m.allocator = "cold"
            m.how += ", cold allocator"
        log(
            f"    client {seconds(m.client_s)}, sends {size(m.sent_bytes)} "
            f"({m.ratio_float32:.2f}x float32), server {seconds(m.server_s)}, "
            f"sum {'ok' if m.sum_ok else 'WRONG'}, wall {m.wall_s:.1f} s"
        )
        rows.append(m)
    if not args.quick:
        reference = next(m for m in rows if m.n == 1000)
        for threshold in (None, 1000 // 2 + 1):
            log(f"secagg+ n=1000 d=1,000,000 (sampled), threshold {threshold} ...")
            for m in masked_stage_sample(1000, 10**6, reference, threshold=threshold):
                log(
                    f"    {m.allocator or 'allocator not fixed'}: client "
                    f"{seconds(m.client_s)}, wall {m.wall_s:.1f} s"
                )
                rows.append(m)
            set_allocator("cold")
    order = {"secagg+": 0, "secagg": 1}
    rows.sort(key=lambda m: (order[m.protocol], m.n, m.d, -m.threshold, m.allocator))
    text = render(rows, command)
    print(text)
    WORK.mkdir(exist_ok=True)
    (WORK / "cost.json").write_text(
        json.dumps(
            [
                asdict(m)
                | {"ratio_float32": m.ratio_float32, "ratio_clear": m.ratio_clear}
                for m in rows
            ],
            indent=1,
        )
    )
    if not args.no_write:
        write_section(text)
    server_ok = True
    if not args.quick:
        server_ok = run_server_rows(
            [(1000, 10**6)],
            batch=args.batch,
            write=not args.no_write,
            command=command,
        )
    log(f"total {time.perf_counter() - started:.0f} s")
    return 0 if server_ok and all(m.sum_ok is not False for m in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
