"""Repository-wide pytest settings."""

# Importing ``python -m fedshield.cli``'s entry module would run the CLI.
collect_ignore = ["src/fedshield/cli/__main__.py"]
