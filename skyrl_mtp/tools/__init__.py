"""Command-line tools (``python -m skyrl_mtp.tools.<name>``)."""
