"""One status poll round of the Retarus adapter over 5,000 in-flight jobs.

The emulator plays an HA region of two data centres on loopback; the jobs are spread over
both, as the HA send URL spreads them. One call of ``status()`` asks every data centre in bulk
(≤1000 ids a request). Goal: at most 2 × ceil(n/1000) requests per data centre.

    python bench/status_poll.py [--jobs 5000] [--latency 0.0]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path

from mailfax.emulators import retarus as emulator_module
from mailfax.model import JobState
from mailfax.providers import retarus
from mailfax.providers.base import ProviderContext, ProviderRef


async def run(jobs: int, latency: float) -> int:
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "3600",
                                                       "latency": str(latency)})
    with tempfile.TemporaryDirectory() as data_dir:
        adapter = retarus.create(ProviderContext("bench", Path(data_dir)),
                                 retarus.Settings.model_validate(emu.provider_settings()))
        try:
            refs = [ProviderRef(f"job{n}", emu.state.add_job("+4930123456", f"job{n}").job_id)
                    for n in range(jobs)]
            goal = 2 * math.ceil(jobs / 1000)
            failed = 0
            for label in ("first round (data centres unknown)", "second round (known)"):
                before = {dc: emu.state.requests_to(dc) for dc in emu.state.data_centres}
                started = time.perf_counter()
                reports = await adapter.status(refs)
                elapsed = time.perf_counter() - started
                pending = sum(report.state == JobState.SUBMITTED
                              for report in reports.values())
                print(f"{label}: {len(reports)} of {jobs} jobs answered ({pending} pending) "
                      f"in {elapsed * 1000:.0f} ms")
                for dc in emu.state.data_centres:
                    count = emu.state.requests_to(dc) - before[dc]
                    verdict = "ok" if count <= goal else "OVER GOAL"
                    failed += count > goal
                    print(f"  {dc}: {count} HTTP requests (goal ≤ {goal}) {verdict}; "
                          f"{len(emu.state.jobs_in(dc))} jobs live there")
                print(f"  HA URL: {emu.state.requests_to('HA')} requests")
            return 1 if failed else 0
        finally:
            await adapter.close()
            await emu.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds the emulator adds to every answer")
    args = parser.parse_args()
    return asyncio.run(run(args.jobs, args.latency))


if __name__ == "__main__":
    sys.exit(main())
