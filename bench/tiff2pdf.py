"""Received-fax conversion: mailfax's TIFF → PDF next to img2pdf, same files, same run.

    python bench/tiff2pdf.py [--repeat 20]

For every TIFF of the corpus (the hostile ones aside): the median time of each converter and the
size of its PDF, then the totals as ratios mailfax / img2pdf (goal: size ≤ 1.05, time ≤ 1.0).
img2pdf runs with its defaults (it also embeds G3/G4 data and reads each page's resolution).
Files img2pdf cannot convert are listed and left out of the totals.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import img2pdf

from mailfax.inbound.convert import tiff_to_pdf

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "fax-tiff"


def median_seconds(convert: Callable[[], bytes], repeat: int) -> tuple[float, int]:
    times = []
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = len(convert())
        times.append(time.perf_counter() - started)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    files = sorted(path for path in CORPUS.iterdir() if path.suffix in (".tif", ".tiff"))
    print(f"{'file':<36} {'mailfax ms':>10} {'img2pdf ms':>10} {'mailfax B':>10} "
          f"{'img2pdf B':>10}")
    totals = {"mailfax_s": 0.0, "img2pdf_s": 0.0, "mailfax_b": 0, "img2pdf_b": 0}
    for path in files:
        data = path.read_bytes()
        ours_s, ours_b = median_seconds(lambda data=data: tiff_to_pdf(data).pdf, args.repeat)
        try:
            theirs_s, theirs_b = median_seconds(lambda data=data: img2pdf.convert(data),
                                                args.repeat)
        except Exception as error:  # img2pdf refuses some inputs; show which
            print(f"{path.name:<36} {ours_s * 1000:>10.2f} {'-':>10} {ours_b:>10} "
                  f"{'-':>10}  (img2pdf: {type(error).__name__})")
            continue
        print(f"{path.name:<36} {ours_s * 1000:>10.2f} {theirs_s * 1000:>10.2f} "
              f"{ours_b:>10} {theirs_b:>10}")
        totals["mailfax_s"] += ours_s
        totals["img2pdf_s"] += theirs_s
        totals["mailfax_b"] += ours_b
        totals["img2pdf_b"] += theirs_b
    print(f"size ratio mailfax / img2pdf: {totals['mailfax_b'] / totals['img2pdf_b']:.3f} "
          f"(goal <= 1.05)")
    print(f"time ratio mailfax / img2pdf: {totals['mailfax_s'] / totals['img2pdf_s']:.3f} "
          f"(goal <= 1.0)")


if __name__ == "__main__":
    main()
