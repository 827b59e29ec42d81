"""The transmission report's cost per delivered mail: a report whose page 1 is rendered for it
(the first recipient of a mail) and one that reuses the page (the other recipients), each
beside rendering the page alone, measured in alternation in the same run so a busy machine
slows all alike. Prints medians in ms and the ratios.

    python bench/report.py [--runs 30] [--pdf ../shared/corpus/pdf/crazyones.pdf]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mailfax.documents.faxrender import STANDARD  # noqa: E402
from mailfax.documents.report import ReportFacts, build_report, render_page_one  # noqa: E402


def facts(job_id: str) -> ReportFacts:
    return ReportFacts(
        sender="Jürgen Müller <juergen@example.org>", subject="Angebot für Größe 5",
        number="+49 30 123456", remote_id="EMULATOR", started_at=datetime.now(UTC),
        duration="0:21", pages_sent=1, pages_submitted=1, attempts=1, provider="main (fax.de)",
        provider_job_id="7001", job_id=job_id, result="Sent.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pdf", type=Path,
                        default=ROOT.parent / "shared" / "corpus" / "pdf" / "crazyones.pdf")
    args = parser.parse_args()
    pdf = args.pdf.read_bytes()
    page = render_page_one(pdf, STANDARD)
    build_report(facts("warm"), page, "en")  # imports, fonts
    cases: dict[str, Callable[[], object]] = {
        "page 1 rendered alone": lambda: render_page_one(pdf, STANDARD),
        "report, page rendered for it": lambda: build_report(
            facts("j1"), render_page_one(pdf, STANDARD), "en"),
        "report, page reused": lambda: build_report(facts("j2"), page, "en"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    base = medians["page 1 rendered alone"]
    for name, median in medians.items():
        print(f"{name:32} {median:7.1f} ms   {median / base:5.2f} × page alone")
    rendered, reused = medians["report, page rendered for it"], medians["report, page reused"]
    shared, alone = rendered + 9 * reused, 10 * rendered
    print(f"a mail to 10 numbers: {shared:.0f} ms of reports ({alone:.0f} ms without reuse, "
          f"ratio {shared / alone:.2f})")


if __name__ == "__main__":
    main()
