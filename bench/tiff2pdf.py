"""Received-fax conversion: mailfax's TIFF → PDF next to img2pdf, same files, same run.

    python bench/tiff2pdf.py [--repeat 20]

For every TIFF of the corpus (the hostile ones aside): the median time of each converter and the
size of its PDF with the ratios mailfax / img2pdf per file, then the totals (goals, per file
and in total: size ≤ 1.05, time ≤ 1.0) and the files that miss a goal.
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


def _corpus() -> Path:
    """``shared/corpus/fax-tiff`` in the nearest folder above this file that has one."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "shared" / "corpus" / "fax-tiff").is_dir():
            return folder / "shared" / "corpus" / "fax-tiff"
    raise SystemExit("corpus not found: shared/corpus/fax-tiff above this checkout")


CORPUS = _corpus()


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
    print(f"{'file':<34} {'mailfax ms':>10} {'img2pdf ms':>10} {'time ×':>7} {'mailfax B':>10} "
          f"{'img2pdf B':>10} {'size ×':>7}")
    totals = {"mailfax_s": 0.0, "img2pdf_s": 0.0, "mailfax_b": 0, "img2pdf_b": 0}
    slower = []
    for path in files:
        data = path.read_bytes()
        ours_s, ours_b = median_seconds(lambda data=data: tiff_to_pdf(data).pdf, args.repeat)
        try:
            theirs_s, theirs_b = median_seconds(lambda data=data: img2pdf.convert(data),
                                                args.repeat)
        except Exception as error:  # img2pdf refuses some inputs; show which
            print(f"{path.name:<34} {ours_s * 1000:>10.2f} {'-':>10} {'-':>7} {ours_b:>10} "
                  f"{'-':>10} {'-':>7}  (img2pdf: {type(error).__name__})")
            continue
        print(f"{path.name:<34} {ours_s * 1000:>10.2f} {theirs_s * 1000:>10.2f} "
              f"{ours_s / theirs_s:>7.2f} {ours_b:>10} {theirs_b:>10} {ours_b / theirs_b:>7.3f}")
        if ours_s > theirs_s or ours_b > 1.05 * theirs_b:
            slower.append(path.name)
        totals["mailfax_s"] += ours_s
        totals["img2pdf_s"] += theirs_s
        totals["mailfax_b"] += ours_b
        totals["img2pdf_b"] += theirs_b
    print(f"total size ratio mailfax / img2pdf: "
          f"{totals['mailfax_b'] / totals['img2pdf_b']:.3f} (goal <= 1.05)")
    print(f"total time ratio mailfax / img2pdf: "
          f"{totals['mailfax_s'] / totals['img2pdf_s']:.3f} (goal <= 1.0)")
    print(f"files over a goal: {', '.join(slower) if slower else 'none'}")


if __name__ == "__main__":
    main()
