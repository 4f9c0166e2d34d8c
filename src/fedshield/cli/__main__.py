"""``python -m fedshield.cli``."""

from fedshield.cli.main import main

main()
