"""Fixtures the adapter tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support import page_server


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[int, Callable[[], object]]]:
    """A one-connection page server running `request.param` (default: as CRIU's); what it saw after."""
    yield from page_server.served(request)
