"""The consumer's liveness file and ``feature-cache --check-alive`` (the consumer in a
container has no port to probe); the running consumer is in test_consumer.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from feature_cache.__main__ import alive_within, touch_alive
from feature_cache.settings import FeatureCacheSettings


def settings_with(alive_file: str) -> FeatureCacheSettings:
    return FeatureCacheSettings(feature_cache={"alive_file": alive_file})


def test_a_touched_file_is_alive_until_it_is_older_than_asked(tmp_path: Path) -> None:
    # Its folder is not there yet, as in a container's fresh emptyDir.
    alive = tmp_path / "feature-cache" / "alive"
    settings = settings_with(str(alive))
    assert not alive_within(settings, 60), "never touched: not alive"
    touch_alive(settings)
    assert alive_within(settings, 60)
    ten_s_ago = time.time() - 10
    os.utime(alive, (ten_s_ago, ten_s_ago))
    assert alive_within(settings, 11)
    assert not alive_within(settings, 9)


def test_without_a_file_setting_the_check_is_refused() -> None:
    settings = settings_with("")
    touch_alive(settings)  # nothing configured: nothing to touch, no error
    with pytest.raises(SystemExit, match="DECISION_FEATURE_CACHE__ALIVE_FILE"):
        alive_within(settings, 60)
