"""Keep Flower's app out of pytest's doctest collection.

``make bench`` runs pytest with ``--doctest-modules`` over ``bench/``, which
imports every module; ``flower_app.py`` needs Flower, which lives only in the
peer benchmark's own environment (``.bench-peers/flower-venv``).
"""

collect_ignore = ["flower_app.py"]
