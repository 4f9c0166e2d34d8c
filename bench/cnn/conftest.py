"""Keep the Flower app out of pytest's doctest collection.

``make bench`` runs pytest with ``--doctest-modules`` over ``bench/``, which
imports every module; ``flower_cnn.py`` needs Flower, which lives only in
``.bench-peers/flower-venv``.
"""

collect_ignore = ["flower_cnn.py"]
