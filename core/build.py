"""Which build this process runs: the version (from the git tag, by setuptools-scm) and
the commit, written into ``core/_version.py`` when the package was built or installed.

Every process that serves /metrics reports them as ``decision_build_info{version,
revision} 1`` (``core.metrics_http``), so a dashboard or an alert can say which build a
pod runs. A tree run without being installed reports ``unknown``.
"""

from __future__ import annotations

try:
    from core._version import commit_id, version
except ImportError:  # pragma: no cover - only a tree that was never installed
    version, commit_id = "unknown", None

VERSION: str = version
# setuptools-scm writes the short commit as "g<hash>", as git describe does.
REVISION: str = (commit_id or "").removeprefix("g") or "unknown"
