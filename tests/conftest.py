"""Fixtures shared by every test: throwaway catalogs and nodes on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.nodes import RunningNode, free_port, node_settings, running_node
from tests.support.postgres import scratch_database


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs twice: on SQLite (the default) and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    else:
        with scratch_database() as url:
            yield url


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Start in-process nodes: ``start_node(catalog_url="", dicom={...}, storage={...})``."""
    with ExitStack() as stack:

        def start(catalog_url: str = "", **sections: dict[str, Any]) -> RunningNode:
            data_dir = tmp_path / f"data-{len(stack._exit_callbacks)}"
            settings = node_settings(data_dir, free_port(), catalog_url, **sections)
            return stack.enter_context(running_node(settings))

        yield start
