"""The log-friendly progress bar (the import path of earlier versions).

Now :mod:`matsciml.lightning.callbacks.progress`.
"""

from __future__ import annotations

from matsciml.lightning.callbacks.progress import LogProgressBar, format_duration, show_warnings_on_rank_zero_only

__all__ = ["LogProgressBar", "format_duration", "show_warnings_on_rank_zero_only"]
