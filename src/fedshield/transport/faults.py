"""Crash points for tests: ``FEDSHIELD_FAULT=<point>[:<n>]``.

At the ``n``-th time (default the first) the process reaches ``point`` it
exits at once with status 137, as if killed (no cleanup, no flush): the
end-to-end tests kill the server or a site exactly there and check what a
restart makes of it. Unset, a crash point costs one dictionary lookup.

Points: ``server.after_reply`` (a reply accepted and persisted, the stage
still open), ``server.after_stage_close`` (a stage's outcome persisted, the
next stage not opened), ``site.mid_fit`` (a site about to train).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

__all__ = ["crash_point"]

logger = logging.getLogger(__name__)

_HITS: Counter[str] = Counter()


def crash_point(point: str) -> None:
    """Exit with status 137 here if ``FEDSHIELD_FAULT`` names this point."""
    spec = os.environ.get("FEDSHIELD_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _HITS[point] += 1
    if _HITS[point] >= int(count or 1):
        logger.error("FEDSHIELD_FAULT: exiting at %s (hit %d)", point, _HITS[point])
        os._exit(137)
