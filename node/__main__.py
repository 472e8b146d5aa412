"""``python -m node``: the ``precedent`` command, for processes started by the node itself."""

from node.cli import app

app()
