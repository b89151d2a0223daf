"""Pieces shared by the fakes of the unit tests."""

from __future__ import annotations


class AlwaysConnected:
    """What a fake replica client needs of ``ModelClient`` besides ``predict``: nothing
    to open or close, and always connected."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def connect(self, timeout_s: float) -> bool:
        return True
