"""Scraping a /metrics endpoint over HTTP on 127.0.0.1 (this module holds no tests)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Scrape:
    """One scrape: the exposition text and its samples."""

    text: str
    content_type: str
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, metric: str, **labels: str) -> float | None:
        """The sample `metric` with exactly these labels, or None."""
        return self.samples.get((metric, frozenset(labels.items())))

    def names(self) -> set[str]:
        """Every sample name."""
        return {name for name, _ in self.samples}


def _get(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:  # noqa: S310
        text = response.read().decode("utf-8")
        content_type = response.headers.get("Content-Type", "")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(text, content_type, samples)


async def scrape(url: str) -> Scrape:
    """GET `url` from a worker thread (the event loop must stay free: the endpoint reads
    loop-owned state through it)."""
    return await asyncio.to_thread(_get, url)


async def scrape_until(
    url: str, check: Callable[[Scrape], bool], timeout: float = 10.0
) -> Scrape:
    """Scrape until `check` holds (for values that an asynchronous step is about to set)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await scrape(url)
        if check(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics did not reach the expected state within {timeout} s")
        await asyncio.sleep(0.05)
