"""Write a run's report from a helper process that got ready while the run ran.

Drawing the report needs matplotlib, whose import and first figure (fonts,
colour maps) cost the better part of a second: about as long as a small
federation takes to train. :class:`ReportPrefetch` starts a child process
(``python -m fedshield.report.prefetch``) when the run starts; on the
machine's other core it imports the plotting stack and draws a first figure
while the parent imports PyTorch and trains, draws the partition heat map as
soon as ``partition.json`` exists, and at the end writes ``report.html`` with
:func:`~fedshield.report.write_report` (the same page, byte for byte, as
writing it in the parent).

The child speaks one JSON object per line on its standard input and output
(``{"cmd": "partition" | "report", "run_dir": ...}`` in; ``{"ok": true,
"path": ...}`` or ``{"ok": false, "error": ...}`` out) and exits at the end
of its input, so it never outlives its parent. Whatever goes wrong with it
(it cannot start, dies, answers late or wrongly) :meth:`ReportPrefetch.write`
raises :class:`PrefetchError` and the caller writes the report itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

__all__ = ["PrefetchError", "ReportPrefetch", "main"]

_log = logging.getLogger(__name__)


class PrefetchError(RuntimeError):
    """The helper process could not write the report (write it in-process)."""


class ReportPrefetch:
    """A child process, warming up to write one run's report.

    Use :meth:`start` (which never raises), then optionally
    :meth:`partition`, then :meth:`write` or :meth:`close`.
    """

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process
        self._answered = False  # the report is written: nothing to wait for

    @classmethod
    def start(cls) -> ReportPrefetch | None:
        """Start the helper; None if it cannot be started (nothing is lost)."""
        env = dict(os.environ)
        # The child must not fight the parent for the cores it trains on.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, "1")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedshield.report.prefetch"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                encoding="utf-8",
                env=env,
            )
        except OSError as err:
            _log.debug("report helper did not start: %s", err)
            return None
        return cls(process)

    def partition(self, run_dir: Path) -> None:
        """Ask the helper to draw ``run_dir``'s partition now (no answer)."""
        self._send({"cmd": "partition", "run_dir": str(run_dir)})

    def write(self, run_dir: Path, *, timeout_s: float = 120.0) -> Path:
        """Have the helper write ``run_dir``'s report; wait for it.

        Raises
        ------
        PrefetchError
            If the helper is gone, fails, or takes longer than ``timeout_s``;
            the helper is stopped then.
        """
        try:
            self._send({"cmd": "report", "run_dir": str(run_dir)})
            reply = _read_line(self._process.stdout, timeout_s)
            if reply is None:
                raise PrefetchError(f"no answer within {timeout_s:g} s")
            try:
                answer = json.loads(reply)
            except json.JSONDecodeError as err:
                raise PrefetchError(f"unreadable answer {reply[:80]!r}") from err
            if not isinstance(answer, dict) or not answer.get("ok"):
                error = answer.get("error") if isinstance(answer, dict) else answer
                raise PrefetchError(f"the helper failed: {error}")
        except BaseException:
            self.close()
            raise
        # Done: the helper exits at the end of its input; its interpreter's
        # teardown need not hold up this process.
        self._answered = True
        self.close(wait=False)
        return Path(str(answer["path"]))

    def close(self, *, wait: bool = True) -> None:
        """Stop the helper (it exits at the end of its input).

        With ``wait`` (the default), wait up to 2 s for it to exit and kill
        it after that; without, only end its input.
        """
        process = self._process
        if not wait or self._answered:
            for stream in (process.stdin, process.stdout):
                if stream is not None and not stream.closed:
                    with contextlib.suppress(OSError):
                        stream.close()
            return
        if process.poll() is None:
            try:
                if process.stdin is not None:
                    process.stdin.close()
                process.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()

    def _send(self, message: dict[str, Any]) -> None:
        stdin = self._process.stdin
        if stdin is None or self._process.poll() is not None:
            raise PrefetchError("the helper has exited")
        try:
            stdin.write(json.dumps(message) + "\n")
            stdin.flush()
        except (OSError, ValueError) as err:  # broken pipe, closed file
            raise PrefetchError(f"the helper is gone: {err}") from err


def _read_line(stream: IO[str] | None, timeout_s: float) -> str | None:
    """One line from ``stream``, or None at its end or after ``timeout_s``."""
    if stream is None:
        return None
    result: list[str] = []

    def read() -> None:
        with contextlib.suppress(OSError, ValueError):
            result.append(stream.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result or not result[0]:
        return None
    return result[0]


def _warm_up() -> None:
    """Import the plotting stack and draw one small figure (loads the fonts)."""
    import io

    from fedshield.report import plots

    fig = plots._new_figure(2.0, 1.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], label="warm-up")
    ax.imshow([[0, 1], [1, 0]], cmap="Blues")
    ax.set_title("warm-up")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png")


def main() -> int:
    """The helper: answer ``report`` commands on stdin until its end."""
    # A real problem shows again, and is answered, when the report is drawn.
    with contextlib.suppress(Exception):
        _warm_up()
    from fedshield.report import html

    for line in sys.stdin:
        try:
            message = json.loads(line)
            run_dir = Path(message["run_dir"])
            if message["cmd"] == "partition":
                # No answer: a failure here shows again, and is answered,
                # when the report itself is drawn.
                with contextlib.suppress(Exception):
                    html.prerender_partition(run_dir)
                continue
            path = html.write_report(run_dir)
            answer: dict[str, Any] = {"ok": True, "path": str(path)}
        except Exception as err:
            answer = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
