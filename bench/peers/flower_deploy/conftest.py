"""Keep the Flower deployment benchmark out of pytest's doctest collection.

``make bench`` runs pytest with ``--doctest-modules`` over ``bench/``, which
imports every module; these need Flower, which lives only in the peer
benchmark's own environment (``.bench-peers/flower-venv``).
"""

collect_ignore = ["run_flower_deploy.py", "app"]
