"""Saying once that a dependency fails, and once that it works again."""

from __future__ import annotations

import logging

# The fetching process logs under one name, whichever of its modules speaks.
logger = logging.getLogger("rates.fetcher")


class OutageNotice:
    """Whether a use of the shared cache fails. A Redis outage is said once when it starts
    (WARNING) and once when it ends (INFO), not for every provider at every flush or read."""

    def __init__(self, failing: str, back: str) -> None:
        self.failing = False
        self._failing_message = failing  # with one %s: the error
        self._back_message = back

    def failed(self, exc: Exception) -> None:
        if not self.failing:
            self.failing = True
            logger.warning(self._failing_message, exc)

    def worked(self) -> None:
        if self.failing:
            self.failing = False
            logger.info(self._back_message)
