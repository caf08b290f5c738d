"""Training-dynamics analysis programs (``pntk``, ``trajectory``); see docs/analysis.md."""
