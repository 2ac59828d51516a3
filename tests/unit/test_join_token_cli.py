"""Pure parts of `gpufleet server join-token`: TTLs, times and the list table."""

from __future__ import annotations

import pytest

from gpufleet.server.join_token_cli import (
    JoinTokenInfo,
    expiry_text,
    iso_time,
    parse_ttl,
    relative_time,
    tokens_table,
)

HOUR_US = 3600 * 1_000_000
NOW_US = 1_767_225_600 * 1_000_000  # 2026-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400.0), ("30m", 1800.0), ("90s", 90.0), ("7d", 604800.0), ("45", 45.0), ("1.5h", 5400.0)],
)
def test_ttl_units(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-1h", "h", "24 hours", "367d", "1w"])
def test_bad_ttls_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--ttl"):
        parse_ttl(text)


def test_times_are_iso_utc_with_a_rounded_relative_part() -> None:
    assert iso_time(NOW_US) == "2026-01-01T00:00:00Z"
    assert relative_time(NOW_US + 24 * HOUR_US - 1_000_000, NOW_US) == "in 24h"
    assert relative_time(NOW_US - 5 * 60 * 1_000_000, NOW_US) == "5m ago"
    assert relative_time(NOW_US + 3 * 86400 * 1_000_000, NOW_US) == "in 3d"
    assert relative_time(NOW_US + 20 * 1_000_000, NOW_US) == "in 20s"
    assert expiry_text(NOW_US + 2 * HOUR_US, NOW_US) == "2026-01-01T02:00:00Z (in 2h)"
    assert expiry_text(None, NOW_US) == "never"


def test_table_shows_ids_expiry_and_state() -> None:
    table = tokens_table(
        [
            JoinTokenInfo("aaaaaaaaaaaa", NOW_US - 48 * HOUR_US, None, is_file_token=True),
            JoinTokenInfo("bbbbbbbbbbbb", NOW_US - 2 * HOUR_US, NOW_US - HOUR_US, False),
            JoinTokenInfo("cccccccccccc", NOW_US, NOW_US + HOUR_US, False),
        ],
        NOW_US,
    )
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "EXPIRES", "STATE"]
    assert lines[1].split() == [
        "aaaaaaaaaaaa", "2025-12-30T00:00:00Z", "never", "valid", "(<state-dir>/join-token)"
    ]
    assert lines[2].split() == [
        "bbbbbbbbbbbb", "2025-12-31T22:00:00Z", "2025-12-31T23:00:00Z", "(1h", "ago)", "expired"
    ]
    assert lines[3].split() == [
        "cccccccccccc", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z", "(in", "1h)", "valid"
    ]
