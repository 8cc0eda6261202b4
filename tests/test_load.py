"""Twenty modalities sending at once: every acknowledged instance is stored, and every series
ends as one job with all its instances."""

from __future__ import annotations

import pytest

from tests.load import run_load

SENDERS, INSTANCES = 20, 150


@pytest.mark.slow
def test_twenty_parallel_senders_lose_nothing_and_split_no_series(tmp_path):
    r = run_load(tmp_path, SENDERS, INSTANCES)
    print(
        f"{r.sent} instances from {r.senders} senders in {r.seconds:.1f} s ({r.per_second:.0f}/s), "
        f"node peak RSS {r.peak_rss_mb:.0f} MB"
    )
    assert r.failed_senders == 0
    assert r.sent == SENDERS * INSTANCES and r.stored == r.sent
    assert r.series == SENDERS and set(r.jobs_per_series.values()) == {1}
    assert r.instances_per_job == [INSTANCES] * SENDERS
