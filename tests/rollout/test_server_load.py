"""Load on `genevolve serve` over loopback: a tiny random model in a server subprocess (so the RSS we
sample is the server's), 32 concurrent official `openai` clients for DURATION_S. Every request is
answered or refused with 503 + Retry-After; none gets a 5xx; the server's RSS does not grow by 10% in
the second half; p50/p99 latency are printed (run with -s)."""
import asyncio
import random

import pytest

from tests.fixtures.servers import ServerProcess, drive_load, save_tiny_hf_dir

DURATION_S = 60
WARMUP_S = 30        # the same load, unmeasured: the engine compiles its prefill/decode shapes here
CLIENTS = 32
MAX_SLOTS = 4
MAX_IN_FLIGHT = 8    # per server: the tiny engine's 4 slots plus a queue of 4; more get 503 + Retry-After


@pytest.mark.slow  # ~130 s: server start (~20 s) + WARMUP_S + DURATION_S
def test_32_openai_clients_for_a_minute(tmp_path):
    openai = pytest.importorskip("openai")
    hf = save_tiny_hf_dir(tmp_path / "hf")
    argv = ["serve", "--hf-dir", hf, "--model-name", "tiny", "--max-slots", str(MAX_SLOTS), "--max-seq-len", "128",
            "--max-in-flight", str(MAX_IN_FLIGHT), "--max-tokens", "16"]
    words = "red blue circle square draw a an the small large green over under next to".split()
    with ServerProcess(argv) as server:
        clients = [openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
                   for _ in range(CLIENTS)]
        rng = random.Random(0)

        async def send_one(k: int, i: int):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 20)))
            try:
                raw = await clients[k].chat.completions.with_raw_response.create(
                    model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=rng.randint(1, 16),
                    temperature=rng.choice([0.0, 0.7, 1.0]))
            except openai.APIStatusError as e:  # 503 (and anything else): the driver counts the status
                return e.response
            raw.parse()  # a 200 must carry a well-formed completion
            return raw.http_response

        async def main():
            warm = await drive_load(send_one, clients=CLIENTS, duration_s=WARMUP_S, rss_of=server.rss_bytes)
            print("\nwarm-up: " + str(dict(sorted(warm.codes.items()))))
            return await drive_load(send_one, clients=CLIENTS, duration_s=DURATION_S, rss_of=server.rss_bytes)

        report = asyncio.run(main())
        print("\n" + report.summary(f"genevolve serve, {CLIENTS} openai clients"))
        assert server.alive()
    assert not report.errors, report.errors[:3]
    assert set(report.codes) <= {200, 503}, report.codes
    assert report.codes.get(200, 0) > 0
    _, _, growth = report.rss_growth_second_half()
    assert growth < 0.10, report.summary("serve")

