"""Run ``fedshield simulate`` as the console script does, with timestamps.

Run: .venv/bin/python bench/peers/fedshield_driver.py EVENTS.json \
         simulate CONFIG.toml [options of fedshield simulate]

Everything after EVENTS.json goes to ``fedshield.cli.main.main`` unchanged,
so the run is the command line's own (imports, config, run folder, report,
exit). The only addition: the callbacks that ``fedshield simulate`` passes
to ``fedshield.api.run.simulate`` are chained with two that note wall-clock
timestamps (``time.time()``): ``on_start`` fires when the federation, model,
strategy and run folder are ready, right before round 1; ``on_round`` after
each round (training, centralised evaluation, metrics and checkpoint
written). EVENTS.json receives them with each round's test accuracy.

With PEERS_PHASES=1 it also marks the end of each step before round 1, by
wrapping the functions ``simulate`` calls (``load_config``, ``load_dataset``,
``split_test``, ``partition``, ``build_federation``, ``build_strategy``,
``resolve_backend``): EVENTS.json gets them as ``marks``, and each mark is
also written to stderr as ``PEERS-MARK <name>``, so that a ``python -X
importtime`` run shows which imports happen in which step.
"""

from __future__ import annotations

import time

T_START = time.time()

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

MARKS: list[tuple[str, float]] = []


def mark(name: str) -> None:
    MARKS.append((name, time.time()))
    print(f"PEERS-MARK {name}", file=sys.stderr, flush=True)


def mark_after(module: Any, attribute: str, name: str) -> None:
    """Wrap ``module.attribute`` so that its return is marked as ``name``."""
    inner = getattr(module, attribute, None)
    if inner is None:  # the code moved: that step is simply not marked
        return

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return inner(*args, **kwargs)
        finally:
            mark(name)

    setattr(module, attribute, wrapper)


def mark_before(module: Any, attribute: str, name: str) -> None:
    """Wrap ``module.attribute`` so that its call is marked as ``name``."""
    inner = getattr(module, attribute, None)
    if inner is None:
        return

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(name)
        return inner(*args, **kwargs)

    setattr(module, attribute, wrapper)


def install_phase_marks() -> None:
    import fedshield.api.experiment as experiment
    import fedshield.api.run as run_module
    import fedshield.cli.simulate as cli_simulate

    mark("import fedshield.cli.simulate, fedshield.api")
    mark_after(cli_simulate, "load_config", "configuration")
    mark_before(experiment, "load_dataset", "import torch (top of build_federation)")
    mark_after(experiment, "load_dataset", "load data")
    mark_after(experiment, "split_test", "test split")
    mark_after(experiment, "partition", "partition")
    mark_after(run_module, "build_federation", "build model")
    mark_after(run_module, "build_strategy", "strategy")
    mark_after(run_module, "resolve_backend", "resolve backend")


def main(argv: list[str]) -> int:
    events_path, cli_args = Path(argv[0]), argv[1:]
    phases = os.environ.get("PEERS_PHASES") == "1"
    events: dict[str, Any] = {
        "import_start": T_START,
        "round_end": [],
        "accuracy": [],
        "loss": [],
    }
    if phases:
        MARKS.append(("python start", T_START))

    from fedshield.cli.main import main as cli_main

    events["cli_imported"] = time.time()
    if phases:
        mark("import CLI")
        install_phase_marks()
    # `fedshield simulate` imports the run module when the command runs; it is
    # imported here, a moment earlier, only to wrap `simulate`.
    import fedshield.api.run as run_module

    events["run_module_imported"] = time.time()
    simulate = run_module.simulate

    def timed_simulate(*args: Any, **kwargs: Any) -> Any:
        on_start: Callable[..., None] | None = kwargs.get("on_start")
        on_round: Callable[..., None] | None = kwargs.get("on_round")

        def started(federation: Any, state: Any) -> None:
            events["round1_start"] = time.time()
            if phases:
                mark("run folder")
            if on_start is not None:
                on_start(federation, state)

        def ended(state: Any, record: Mapping[str, Any]) -> None:
            events["round_end"].append(time.time())
            events["accuracy"].append(record.get("accuracy"))
            events["loss"].append(record.get("loss"))
            if phases and len(events["round_end"]) <= 2:
                mark(f"round {len(events['round_end'])}")
            elif phases:  # noted once, after the last round, in MARKS
                print("PEERS-MARK rounds 3..R", file=sys.stderr, flush=True)
            if on_round is not None:
                on_round(state, record)

        kwargs["on_start"], kwargs["on_round"] = started, ended
        events["simulate_called"] = time.time()
        try:
            return simulate(*args, **kwargs)
        finally:
            events["simulate_returned"] = time.time()
            if phases:
                if len(events["round_end"]) > 2:
                    MARKS.append(("rounds 3..R", events["round_end"][-1]))
                mark("after the last round")

    run_module.simulate = timed_simulate  # type: ignore[assignment]
    code = 0
    try:
        cli_main(cli_args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if not stop.code else 1)
    finally:
        events["exit"] = time.time()
        events["marks"] = MARKS
        events_path.write_text(json.dumps(events, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
