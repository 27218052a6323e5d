"""Both HTTP servers under concurrent load, as subprocesses of the real CLI, through the functions
bench/serving_load.py runs for a minute (its figures are in BENCHMARKS.md). Here a run ends after a
count of answered requests, not a time, and asserts what the long run relies on: every request is
answered (200) or refused with a well-formed 503 + Retry-After, none gets another 5xx or a transport
error, the refusals happen (the admission bound is reached and holds), the server's own counters
agree with what the clients saw, and the server is alive at the end. RSS growth needs a long run:
the benchmark reports it."""
import pytest

from bench.serving_load import LoadReport, render_service_load, serve_load
from tests.fixtures.servers import save_tiny_hf_dir


def assert_answered_or_refused(report: LoadReport, requests: int) -> None:
    """``requests`` answered with 200, every other reply a 503 in the server's refusal shape, and
    the server counted the same."""
    assert report.server_alive
    assert not report.errors, report.errors[:3]
    assert not report.malformed, report.malformed[:3]
    assert set(report.codes) == {200, 503}, report.codes  # refusals happened, and nothing else went wrong
    assert report.codes[200] == requests
    assert report.counted("served") == requests
    assert report.counted("refused_busy") == report.codes[503]


@pytest.mark.slow  # server start and the tiny engine's first compiles dominate
def test_32_openai_clients_against_serve(tmp_path):
    pytest.importorskip("openai")
    max_in_flight, requests = 8, 16
    # A refused client honours Retry-After (1 s): fewer refusals to serve while the engine compiles.
    report = serve_load(save_tiny_hf_dir(tmp_path / "hf"), clients=32, requests=requests,
                        max_in_flight=max_in_flight, max_backoff_s=1.0, seed=7)
    assert_answered_or_refused(report, requests)
    assert 0 < report.peak("in_flight") <= max_in_flight
    assert report.health_after["in_flight"] == 0  # every admitted request released its place
    assert report.counted("cancelled") == 0 and report.counted("bad_requests") == 0


@pytest.mark.slow
def test_concurrent_clients_against_the_tiny_render_service():
    queue_size, requests = 4, 16
    report = render_service_load(clients=12, requests=requests, queue_size=queue_size, max_backoff_s=1.0, seed=3)
    assert_answered_or_refused(report, requests)
    assert report.peak("queue_depth") <= queue_size
    assert report.health_after["queue_depth"] == 0 and report.health_after["busy"] == 0
    assert report.counted("failed") == 0 and report.counted("cancelled") == 0
