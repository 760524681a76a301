"""Offline tools (reward and guard head training, the reward report): run as `python tools/<name>.py` or
`python -m tools.<name>` from the repository root. Nothing under therapy_rl/ imports them."""
