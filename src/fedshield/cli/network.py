"""``fedshield serve`` and ``fedshield join``: status lines and summaries."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from fedshield.core import ServerState

__all__ = ["run_join", "run_serve"]


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_serve(
    config: Path,
    *,
    ca: Path | None,
    state: Path,
    listen: str,
    port_file: Path | None,
    as_json: bool,
    console: Console,
) -> dict[str, Any]:
    """Serve the run; print a line per round and the summary."""
    from fedshield.api.network import serve

    _logging()

    def on_listening(port: int) -> None:
        if not as_json:
            console.print(
                f"listening on port {port} ({'mutual TLS' if ca else 'insecure'}); "
                f"state in {state}",
                highlight=False,
            )

    def on_round(new_state: ServerState, record: Mapping[str, Any]) -> None:
        if as_json:
            return
        acc = record.get("accuracy")
        parts = [f"round {new_state.round_idx}"]
        if record.get("num_clients") is not None:
            parts.append(f"{record['num_clients']} sites")
        if acc is not None:
            parts.append(f"accuracy {acc:.4f}")
        if record.get("epsilon") is not None:
            parts.append(f"epsilon {record['epsilon']:.3f}")
        console.print(", ".join(parts), highlight=False)

    outcome = serve(
        config,
        ca_dir=ca,
        state_dir=state,
        listen=listen,
        port_file=port_file,
        on_round=on_round,
        on_listening=on_listening,
    )
    summary = outcome.summary
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    else:
        console.print(
            f"[bold]{summary.get('status')}[/]: {summary.get('rounds')} rounds, "
            f"accuracy {summary.get('accuracy')}; outputs in {state}",
            highlight=False,
        )
    return summary


def run_join(
    server: str,
    *,
    data: Path,
    identity: Path | None,
    policy: Path | None,
    model: Path | None,
    insecure: bool,
    name: str | None,
    connect_timeout_s: float,
    console: Console,
) -> int:
    """Join as a site; print a status line on each change."""
    from fedshield.api.network import load_site_data, site_builder
    from fedshield.errors import ConfigError
    from fedshield.transport.auth import load_identity
    from fedshield.transport.site import SiteClient, TaskLedger, run_site

    _logging()
    if identity is None and not insecure:
        raise ConfigError("give --identity DIR (or --insecure and --name on loopback)")
    if insecure and not name:
        raise ConfigError("--insecure needs --name (the site's name)")
    ident = load_identity(identity) if identity is not None else None
    site_policy = None
    if policy is not None:
        from fedshield.transport.policy import SitePolicy

        site_policy = SitePolicy.load(policy)
    build = site_builder(
        load_site_data(data), policy=site_policy, model_source=model, identity=ident
    )
    started = time.monotonic()

    def status(text: str) -> None:
        console.print(f"[{time.monotonic() - started:7.1f} s] {text}", highlight=False)

    client = SiteClient(
        server,
        ident,
        build,
        insecure=insecure,
        name=name,
        connect_timeout_s=connect_timeout_s,
        status=status,
        ledger=TaskLedger(identity / "ledger.json" if identity is not None else None),
    )
    done = run_site(client)
    console.print(f"done: answered {done} tasks", highlight=False)
    return done
