"""The fax-readiness check: pages that arrive (almost) blank or (almost) black at the recipient.

A fax is black and white (see :mod:`mailfax.documents.faxrender`): light colours and grey text
below half brightness vanish, a dark photo turns into a black rectangle. Before a fax is
queued each of its pages is rendered as the recipient receives it and measured:

- **empty**: less than ``empty_below`` of the faxed page is black, while the original page had
  ink (anything darker than white, in colour) and at least four times more of it than is
  left. A page that is blank in the original is *not* flagged: it arrives as the sender made
  it (a blank back side, a separator page); this check is about what the conversion to black
  and white changes, not about the document. A page with a little black on it (only a page
  number) is not flagged either: its black survives. Nor, by the same mark, is a page whose
  light grey body sits under a black letterhead: the share is of the whole page.
- **black**: more than ``black_above`` of the faxed page is black (a dark photo, a black
  background): it costs the recipient toner and transmission time, and what it shows is lost.

The cause is named from the original page: its ink in colour ("light colours") or in grey
("light grey text"); a black page from mid-tones ("a dark photo or picture") or from black
already there ("a black background").

Pure and CPU-bound (:mod:`mailfax.documents.readiness_pool` runs :func:`check_documents` in
worker processes). Cost: about one fax
render a page (``bench/readiness.py``), so only the first ``max_pages`` pages are looked at.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

from mailfax.documents.faxrender import (
    STANDARD,
    FaxResolution,
    black_fraction,
    render_as_faxed,
    rendered_page,
)
from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    from PIL import Image, ImageChops

else:
    Image = lazy_module("PIL.Image")
    ImageChops = lazy_module("PIL.ImageChops")

log = logging.getLogger(__name__)

Problem = Literal["empty", "black"]
Cause = Literal["light-colours", "grey-text", "dark-photo", "black-background"]

ORIGINAL_DPI = 72  # the original is only looked at for "is there ink, and in what colour"
INK_BELOW = 245  # of 255 (grey): darker than this is ink on the original page
COLOURFUL_CHROMA = 48  # max - min of R, G, B above this: a colour, not a grey
SOLID_BELOW = 40  # of 255: black already in the original
VANISHED_SHARE = 4  # empty only when the original had this many times more ink than is left

CAUSE_TEXT: dict[Cause, str] = {
    "light-colours": "light colours",
    "grey-text": "light grey text",
    "dark-photo": "a dark photo or picture",
    "black-background": "a black background",
}
PROBLEM_TEXT: dict[Problem, str] = {"empty": "may arrive blank", "black": "may arrive black"}


class Paged(Protocol):
    """What the check reads of a document (a :class:`~mailfax.providers.base.FaxDocument`,
    or what a worker process is sent of one)."""

    @property
    def filename(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def pages(self) -> int: ...


class Finding(TypedDict):
    """One flagged page, as stored in ``job.options["warnings"]`` (OPTIONS.md)."""

    page: int  # 1-based, counted over the whole fax (a cover page included)
    problem: Problem
    text: str  # one English sentence naming the page and the cause
    cause: Cause  # for templates in other languages
    document: str  # the file the page is in, and its page there
    document_page: int


@dataclass(frozen=True)
class ReadinessLimits:
    empty_below: float = 0.0005  # share of the faxed page that is black: 0.05 %
    black_above: float = 0.60
    max_pages: int = 20  # pages beyond these are not looked at (cost)
    max_seconds: float = 5.0  # nor pages once this long was spent (a photo: 0.5-1 s)


@dataclass(frozen=True)
class PageMeasure:
    """Shares (0..1) of one page, as faxed and as the original."""

    faxed_black: float
    original_ink: float  # darker than white at all
    original_colour: float  # of the ink: the share in colour
    original_solid: float  # already (nearly) black in the original


def inspect_page(pdf: bytes, index: int, limits: ReadinessLimits,
                 resolution: FaxResolution = STANDARD) -> tuple[Problem, Cause] | None:
    """What is wrong with page ``index`` (0-based) of ``pdf`` as faxed, and why; None: fine.

    Most pages end after the fax render: only a page whose black share is out of bounds is
    looked at again, in the original, to tell why (and whether it was blank already)."""
    faxed = black_fraction(render_as_faxed(pdf, index, resolution))
    if limits.empty_below <= faxed <= limits.black_above:
        return None
    return judge(measure_original(pdf, index, faxed), limits)


def measure_original(pdf: bytes, index: int, faxed_black: float) -> PageMeasure:
    original = _render_original(pdf, index)
    grey = original.convert("L").histogram()
    total = original.width * original.height or 1
    ink = sum(grey[:INK_BELOW])
    red, green, blue = original.split()
    chroma = ImageChops.subtract(ImageChops.lighter(ImageChops.lighter(red, green), blue),
                                 ImageChops.darker(ImageChops.darker(red, green), blue))
    # Coloured ink: chroma above the mark where the page is not white (white has none).
    colourful = sum(chroma.histogram()[COLOURFUL_CHROMA + 1:])
    return PageMeasure(faxed_black=faxed_black, original_ink=ink / total,
                       original_colour=min(1.0, colourful / ink) if ink else 0.0,
                       original_solid=sum(grey[:SOLID_BELOW]) / total)


def _render_original(pdf: bytes, index: int) -> Image.Image:
    return rendered_page(pdf, index, ORIGINAL_DPI, grayscale=False)


def judge(measure: PageMeasure, limits: ReadinessLimits) -> tuple[Problem, Cause] | None:
    """What is wrong with a page so measured, and why; None: it arrives as it should."""
    if measure.faxed_black > limits.black_above:
        solid = measure.original_solid >= measure.faxed_black / 2
        return "black", "black-background" if solid else "dark-photo"
    if (measure.faxed_black < limits.empty_below
            and measure.original_ink >= limits.empty_below
            and measure.original_ink >= VANISHED_SHARE * measure.faxed_black):
        return "empty", "light-colours" if measure.original_colour > 0.5 else "grey-text"
    return None


def finding(page: int, problem: Problem, cause: Cause, document: str = "",
            document_page: int | None = None) -> Finding:
    document_page = page if document_page is None else document_page
    where = f" ({document}, page {document_page})" if document_page != page else ""
    return Finding(page=page, problem=problem, cause=cause, document=document,
                   document_page=document_page,
                   text=f"Page {page}{where} {PROBLEM_TEXT[problem]} at the fax "
                        f"({CAUSE_TEXT[cause]}).")


def check_documents(documents: Sequence[Paged], limits: ReadinessLimits,
                    resolution: FaxResolution = STANDARD) -> list[Finding]:
    """The findings for the first ``limits.max_pages`` pages of the fax, in page order (or
    fewer, once ``limits.max_seconds`` are spent).

    A page that cannot be rendered here is skipped (logged): the check only warns, and the
    document was already validated when it was assembled."""
    findings: list[Finding] = []
    page = 0
    deadline = time.monotonic() + limits.max_seconds
    for document in documents:
        for index in range(document.pages):
            page += 1
            if page > limits.max_pages or time.monotonic() > deadline:
                return findings
            try:
                verdict = inspect_page(document.data, index, limits, resolution)
            except Exception as error:  # pdfium's errors have no common base we could name
                log.warning("readiness: page %d of %s not checked: %s", index + 1,
                            document.filename, error)
                continue
            if verdict is not None:
                findings.append(finding(page, *verdict, document.filename, index + 1))
    return findings


def short_text(findings: Sequence[Finding], most: int = 3) -> str:
    """For an SMTP reply line: ``page 2 may arrive blank (light grey text); page 5 …``."""
    parts = [f"page {item['page']} {PROBLEM_TEXT[item['problem']]} "
             f"({CAUSE_TEXT[item['cause']]})" for item in findings[:most]]
    if len(findings) > most:
        parts.append(f"{len(findings) - most} more page(s) too")
    return "; ".join(parts)


def refusal_text(findings: Sequence[Finding]) -> str:
    """Why a mail is refused (``documents.readiness = "refuse"``), and what to do."""
    return (f"Not faxed: {short_text(findings)}, as a fax is black and white. Use black text "
            "on white and lighter pictures, then send it again.")


# In "warn" mode the check runs after the 250 (mailfax/intake/readiness_check.py). A job
# checked so carries ``options["readiness"]``: "pending" until its check is recorded (it is
# held from dispatch meanwhile), then "checked" or "not checked". Its acceptance mail comes
# from the event that records the check (detail starting with CHECK_EVENT), not from the
# event of its creation.
READINESS_OPTION = "readiness"
PENDING = "pending"
CHECKED = "checked"
NOT_CHECKED = "not checked"
CHECK_EVENT = "fax-readiness"


def checked_after_acceptance(options: Mapping[str, object]) -> bool:
    """Whether the job's check runs (or ran) after its 250: its acceptance mail waits."""
    return READINESS_OPTION in options


def is_check_event(detail: str) -> bool:
    return detail.startswith(CHECK_EVENT)


def check_event_detail(findings: Sequence[Finding], checked: bool, why: str = "") -> str:
    """The job history's line for a check: ``fax-readiness checked: page 2 may arrive …``."""
    if not checked:
        return f"{CHECK_EVENT} not checked: {why or 'no result'}"
    return f"{CHECK_EVENT} checked: {short_text(findings) if findings else 'no page flagged'}"
