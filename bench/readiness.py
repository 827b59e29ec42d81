"""Time per page of the fax-readiness check (``documents/readiness.py``), next to what intake
already spends per page on the same document before the 250 as 1.0 (``prepare_pdf``: open,
validate, count; for a photo ``image_to_pdf``).

    python bench/readiness.py [--repeat 5]

Rows: a text letter (ReportLab, 40 lines), the corpus newsletter (VIA_Nytt_1402.pdf), a phone
photo as intake puts it on A4 (``image_to_pdf``, 12 megapixel JPEG), a dark photo (flagged:
the original is rendered a second time to name the cause), a light grey page (flagged), and
a 200-page text mail, of which the default cap (``readiness_max_pages = 20``) renders 20.
Each figure is the median of ``--repeat`` runs divided by the pages of the PDF.

Then what the sender sees: the time to the 250 over SMTP of the letter and of the 200-page
mail, from two mailfax instances in this process, ``documents.readiness = "off"`` and
``"warn"``, sent to in alternation so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = next((folder / "shared" / "corpus" for folder in ROOT.parents
               if (folder / "shared" / "corpus").is_dir()), ROOT.parent / "shared" / "corpus")

from mailfax.app import Application  # noqa: E402
from mailfax.documents.pdf import image_to_pdf, prepare_pdf  # noqa: E402
from mailfax.documents.readiness import ReadinessLimits, check_documents  # noqa: E402
from mailfax.providers.base import FaxDocument  # noqa: E402
from tests.conftest import Service, make_settings  # noqa: E402
from tests.test_readiness import pdf, photo, text  # noqa: E402


def phone_photo() -> bytes:
    """A 12 megapixel JPEG, grey photo-like noise (what a phone sends)."""
    from PIL import Image

    picture = Image.effect_noise((4032, 3024), 60).point(lambda value: value // 2 + 90)
    jpeg = io.BytesIO()
    Image.merge("RGB", [picture] * 3).save(jpeg, format="JPEG", quality=85)
    return jpeg.getvalue()


Conversion = Callable[[], FaxDocument]


def samples() -> list[tuple[str, Conversion]]:
    """Each document as intake converts it before the 250 (the 1.0 of its row)."""
    def as_pdf(data: bytes) -> Conversion:
        return functools.partial(prepare_pdf, "bench.pdf", data)
    return [("text letter, 1 page", as_pdf(pdf(text(0.0)))),
            ("corpus VIA_Nytt_1402.pdf",
             as_pdf((CORPUS / "pdf" / "VIA_Nytt_1402.pdf").read_bytes())),
            ("phone photo (image_to_pdf)", functools.partial(image_to_pdf, "photo.jpg",
                                                             phone_photo())),
            ("dark photo (flagged black)", as_pdf(pdf(photo(60)))),
            ("light grey text (flagged blank)", as_pdf(pdf(text(0.85)))),
            ("200-page text mail (20 checked)", as_pdf(pdf(*[text(0.0)] * 200)))]


def median_seconds(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_page(repeat: int) -> None:
    limits = ReadinessLimits()
    print(f"{'document':<36} {'pages':>5} {'intake ms/p':>12} {'check ms/p':>11} "
          f"{'× intake':>9} {'check ms':>9}  findings")
    for name, convert in samples():
        prepared = convert()
        document = FaxDocument("bench.pdf", prepared.data, prepared.pages)
        check_documents([document], limits)  # warm: imports, fonts
        prepare = median_seconds(convert, repeat)
        check = median_seconds(functools.partial(check_documents, [document], limits), repeat)
        found = ", ".join(f"{item['page']} {item['problem']}"
                          for item in check_documents([document], limits)) or "-"
        pages = prepared.pages
        print(f"{name:<36} {pages:>5} {prepare * 1000 / pages:>12.1f} "
              f"{check * 1000 / pages:>11.1f} {check / prepare:>9.1f} {check * 1000:>9.0f}  "
              f"{found}")


async def reply_times(repeat: int) -> None:
    """Median seconds to the 250, readiness off and on, for two mails."""
    with tempfile.TemporaryDirectory() as folder:
        services = {}
        for mode in ("off", "warn"):
            app = Application(make_settings(Path(folder) / mode, documents={"readiness": mode}))
            await app.start()
            services[mode] = Service(app)
        try:
            print(f"\n{'mail':<36} {'250 off s':>10} {'250 warn s':>11} {'warn/off':>9}")
            for name, data in (("text letter, 1 page", pdf(text(0.0))),
                               ("200-page text mail", pdf(*[text(0.0)] * 200))):
                times: dict[str, list[float]] = {"off": [], "warn": []}
                for _ in range(repeat + 1):  # the first round warms up
                    for mode, service in services.items():
                        start = time.perf_counter()
                        await service.fax_pdf(data)
                        times[mode].append(time.perf_counter() - start)
                off, warn = (statistics.median(times[mode][1:]) for mode in ("off", "warn"))
                print(f"{name:<36} {off:>10.3f} {warn:>11.3f} {warn / off:>9.2f}")
        finally:
            for service in services.values():
                await service.app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    per_page(repeat)
    asyncio.run(reply_times(repeat))

if __name__ == "__main__":
    main()
