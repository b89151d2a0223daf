"""The committed-offsets file: durable commits, torn-tail repair, compaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from localkafka import offsets as offsets_module
from localkafka.offsets import FILE_NAME, CommittedOffset, OffsetStore


def opened(data_dir: Path) -> OffsetStore:
    store = OffsetStore(data_dir)
    store.open()
    return store


def test_commits_survive_reopening_and_the_latest_wins(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.commit("g", {("t", 0): CommittedOffset(5, "m"), ("t", 1): CommittedOffset(7, "")})
    store.commit("g", {("t", 0): CommittedOffset(9, "later")})
    store.commit("other", {("t", 0): CommittedOffset(1, "")})
    store.close()

    again = opened(tmp_path)
    assert again.get("g", "t", 0) == CommittedOffset(9, "later")
    assert again.get("g", "t", 1) == CommittedOffset(7, "")
    assert again.get("other", "t", 0) == CommittedOffset(1, "")
    assert again.get("g", "t", 2) is None
    # Reopening rewrote the file with one frame per live commit.
    assert (tmp_path / FILE_NAME).read_bytes().count(b'"g"') == 2


def test_a_commit_is_in_the_file_before_commit_returns(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.commit("g", {("t", 3): CommittedOffset(42, "")})
    # No close, no fsync: a second reader (a restarted broker after a kill) sees it.
    assert opened(tmp_path).get("g", "t", 3) == CommittedOffset(42, "")
    store.close()


def test_a_torn_tail_is_dropped(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.commit("g", {("t", 0): CommittedOffset(1, "")})
    store.commit("g", {("t", 0): CommittedOffset(2, "")})
    store.close()
    path = tmp_path / FILE_NAME
    path.write_bytes(path.read_bytes()[:-3])
    assert opened(tmp_path).get("g", "t", 0) == CommittedOffset(1, "")


def test_deleting_a_topic_removes_its_commits(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.commit("g", {("gone", 0): CommittedOffset(1, ""), ("kept", 0): CommittedOffset(2, "")})
    store.delete_topic("gone")
    store.close()
    again = opened(tmp_path)
    assert dict(again.group("g")) == {("kept", 0): CommittedOffset(2, "")}


def test_the_file_is_compacted_while_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offsets_module, "_COMPACT_MIN_FRAMES", 50)
    store = opened(tmp_path)
    for offset in range(500):
        store.commit("g", {("t", 0): CommittedOffset(offset, ""), ("t", 1): CommittedOffset(0, "")})
    assert (tmp_path / FILE_NAME).read_bytes().count(b'"g"') <= 52
    store.close()
    assert opened(tmp_path).get("g", "t", 0) == CommittedOffset(499, "")
