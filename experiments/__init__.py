"""Command-line experiment programs for pilimit, run as ``python -m experiments.<group>.<program>``.

Nothing in ``inf/`` imports from here; these programs import ``inf``.
"""
