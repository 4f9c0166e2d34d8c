"""A 100 MB model over the Fleet transport on loopback: MB/s each way.

    .venv/bin/python bench/network/throughput.py [--repeats 3] [--mb 100]

A :class:`~fedshield.transport.loopback.LoopbackBackend` (a real
``FleetServer`` with its ``GrpcBackend``, ``Mailbox`` and on-disk store,
and one ``SiteClient`` in a thread, insecure 127.0.0.1, default 1 MiB
chunks) carries stages whose model is 25,000,000 float32 (100 MB,
MB = 10^6 bytes):

download (server → site)
    an ``evaluate`` stage with the 100 MB model; the site's fake client
    returns three numbers. Timed from ``run_stage`` to the reply in the
    round loop's hands: encoding the task, SHA-256, the long poll,
    ``FetchBlob`` in chunks, the site's digest checks and decoding, the
    tiny reply.
upload (site → server)
    a ``fit`` stage whose request carries a 2-parameter model and whose fake
    client returns a 100 MB update (the backend does not compare shapes; the
    strategy would). Timed the same way: the site's encoding and SHA-256,
    ``PushResult`` in chunks written to ``uploads/``, the server reading it
    back, checking, decoding, storing it durably (blob + fsync + SQLite), and
    the round loop's decoding.

A first stage with a small model connects the site; then each direction
``--repeats`` times (best and median). In the same command: a raw loopback
TCP copy of the same bytes (one ``sendall``, ``recv_into`` a preallocated
buffer, two threads) as the ceiling, and the cost of the steps the
transport takes (encode, decode, SHA-256, fsync'd write) on the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRss, machine, update_results

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.simulation import (
    EvaluateIns,
    FitIns,
    StageReply,
    StageRequest,
    wire,
)

SITE = "site"


class _Client:
    """Evaluate: three numbers back. Fit: an update of ``upload`` parameters."""

    def __init__(self, upload: Params | None) -> None:
        self.upload = upload

    def fit(self, params: Params, config: FitConfig, rng: Any) -> ClientUpdate:
        assert self.upload is not None
        return ClientUpdate(SITE, self.upload, 10, {"loss": 0.5})

    def evaluate(self, params: Params, config: EvalConfig) -> Mapping[str, float]:
        return {"loss": float(params.flat[0]), "accuracy": 1.0, "num_examples": 10.0}


def _big(n: int, seed: int) -> Params:
    rng = np.random.default_rng(seed)
    return Params({"w": rng.standard_normal(n, dtype=np.float32)})


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def raw_tcp(nbytes: int) -> float:
    """Seconds to copy ``nbytes`` over a loopback TCP socket (two threads)."""
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    sink = bytearray(nbytes)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def receive() -> None:
        conn, _ = listener.accept()
        view, got = memoryview(sink), 0
        with conn:
            while got < nbytes:
                n = conn.recv_into(view[got:], min(nbytes - got, 4 << 20))
                if n == 0:
                    break
                got += n
        done.set()

    thread = threading.Thread(target=receive)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as out:
        started = time.perf_counter()
        out.sendall(data)
        done.wait()
        seconds = time.perf_counter() - started
    thread.join()
    listener.close()
    assert sink[:16] == data[:16] and sink[-16:] == data[-16:]
    return seconds


def steps(params: Params, tmp: Path) -> dict[str, float]:
    """Seconds of the steps the transport runs on the model's bytes."""
    request = StageRequest(
        "evaluate", 0, {SITE: EvaluateIns(params, EvalConfig(round_idx=0))}
    )
    out: dict[str, float] = {}
    payload = b""

    def enc() -> None:
        nonlocal payload
        payload = wire.encode_request(request, [SITE], 0)

    out["encode_request"] = _timed(enc)
    out["decode_request"] = _timed(lambda: wire.decode_request(payload))
    out["sha256"] = _timed(lambda: hashlib.sha256(payload).hexdigest())
    reply = StageReply(SITE, value=ClientUpdate(SITE, params, 10, {"loss": 0.5}))
    data = b""

    def enc_reply() -> None:
        nonlocal data
        data = wire.encode_reply(reply)

    out["encode_reply"] = _timed(enc_reply)
    out["decode_reply"] = _timed(lambda: wire.decode_reply(data))
    path = tmp / "fsync-probe"

    def write() -> None:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    out["write_fsync"] = _timed(write)
    out["read_back"] = _timed(path.read_bytes)
    path.unlink()
    return out


def instrument() -> dict[str, list[float]]:
    """Time the transport's steps in this process (wrappers; src unchanged)."""
    import collections

    from fedshield.transport import backend, server, site, store

    spent: dict[str, list[float]] = collections.defaultdict(list)

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label].append(time.perf_counter() - started)

        return call

    for owner, names in (
        (site.SiteClient, ("_fetch", "_payload", "_answer", "_push")),
        (server.FleetServer, ("take_result",)),
        (backend.Mailbox, ("owner", "accept")),
        (store.BlobStore, ("put",)),
        (wire, ("encode_request", "decode_request", "encode_reply", "decode_reply")),
    ):
        for name in names:
            label = f"{getattr(owner, '__name__', owner)}.{name}".replace(
                "fedshield.simulation.", ""
            )
            setattr(owner, name, timed(label, getattr(owner, name)))
    digest: Any = vars(backend.OpenTask)["payload_digest"]
    label = "OpenTask.payload_digest (SHA-256 of the payload)"
    task_class: Any = backend.OpenTask
    task_class.payload_digest = property(timed(label, digest.fget))
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time the transport's steps (one download and one upload after "
        "the measured repeats; wrappers in this process)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    from fedshield.transport.loopback import LoopbackBackend

    n = int(args.mb * 1e6) // 4
    nbytes = 4 * n
    rss = PeakRss(os.getpid())
    big = _big(n, 1)
    small = Params({"w": np.zeros(2, np.float32)})
    result: dict[str, Any] = {
        "command": "python bench/network/throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "parameters": n,
        "bytes": nbytes,
        "chunk_bytes": args.chunk_kib << 10,
    }
    result["raw_tcp_s"] = [raw_tcp(nbytes) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="fedshield-bench-tput-") as tmp:
        result["steps_s"] = steps(big, Path(tmp))
        backend = LoopbackBackend(
            [SITE],
            fresh_store=False,
            serial=False,
            state_dir=Path(tmp) / "state",
            chunk_bytes=args.chunk_kib << 10,
            poll_s=5.0,
            heartbeat_s=2.0,
        )
        try:
            client = _Client(big)

            def client_fn(cid: str) -> _Client:
                return client

            def stage(kind: str, round_idx: int, params: Params) -> float:
                if kind == "evaluate":
                    message: Any = EvaluateIns(params, EvalConfig(round_idx=round_idx))
                else:
                    message = FitIns(params, FitConfig(round_idx=round_idx))
                request = StageRequest(kind, round_idx, {SITE: message})
                started = time.perf_counter()
                replies = list(backend.run_stage(request, client_fn=client_fn, seed=3))
                seconds = time.perf_counter() - started
                assert len(replies) == 1 and replies[0].ok, replies[0].failure
                if kind == "fit":
                    got = replies[0].value.delta.flat
                    assert got.size == n and got[-1] == big.flat[-1]
                return seconds

            result["warmup_small_evaluate_s"] = stage("evaluate", 0, small)
            down, up = [], []
            for k in range(args.repeats):
                down.append(stage("evaluate", 1 + 2 * k, big))
                up.append(stage("fit", 2 + 2 * k, small))
                print(
                    f"repeat {k}: download {nbytes / down[-1] / 1e6:.0f} MB/s "
                    f"({down[-1]:.2f} s), upload {nbytes / up[-1] / 1e6:.0f} MB/s "
                    f"({up[-1]:.2f} s)",
                    flush=True,
                )
            if args.breakdown:
                spent = instrument()
                k = args.repeats
                result["breakdown_download_s"] = stage("evaluate", 1 + 2 * k, big)
                got = {key: (len(v), sum(v)) for key, v in spent.items()}
                spent.clear()
                result["breakdown_upload_s"] = stage("fit", 2 + 2 * k, small)
                result["breakdown"] = {
                    "download": {
                        k2: {"calls": c, "seconds": t} for k2, (c, t) in got.items()
                    },
                    "upload": {
                        k2: {"calls": len(v), "seconds": sum(v)}
                        for k2, v in spent.items()
                    },
                }
                for way in ("download", "upload"):
                    print(f"{way} breakdown ({result[f'breakdown_{way}_s']:.2f} s):")
                    rows = result["breakdown"][way].items()
                    for label, row in sorted(rows, key=lambda kv: -kv[1]["seconds"]):
                        print(f"  {label:50s} x{row['calls']}  {row['seconds']:.3f} s")
        finally:
            backend.close()
    rss.stop()
    result["download_s"] = down
    result["upload_s"] = up

    def rates(seconds: list[float]) -> dict[str, float]:
        return {
            "best_MBps": nbytes / min(seconds) / 1e6,
            "median_MBps": nbytes / statistics.median(seconds) / 1e6,
        }

    result["download"] = rates(down)
    result["upload"] = rates(up)
    result["raw_tcp"] = rates(result["raw_tcp_s"])
    result["process_peak_rss_mib"] = rss.peak_mib
    for key in ("download", "upload", "raw_tcp"):
        r = result[key]
        print(
            f"{key}: best {r['best_MBps']:.0f} MB/s, median {r['median_MBps']:.0f} MB/s"
        )
    print("steps (s):", {k: round(v, 3) for k, v in result["steps_s"].items()})
    print(f"peak RSS of this process: {rss.peak_mib:.0f} MiB")
    if not args.no_save:
        update_results("throughput", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
