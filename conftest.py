# Makes the repository root importable for pytest (``inf``, ``experiments``, ``benchmarks``).
