"""The cover page: which text goes on it, and that it renders readably in both languages."""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pypdf
import pytest

from mailfax.documents.cover import COVER_FILENAME, CoverInfo, cover_text, render_cover

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
WHEN = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def info(text: str, *, document_pages: int = 2, subject: str = "Angebot") -> CoverInfo:
    return CoverInfo(sender="Jürgen Groß <jg@example.de>", number="+49 30 123456",
                     subject=subject, date=WHEN, text=text, document_pages=document_pages)


def page_texts(data: bytes) -> list[str]:
    return [page.extract_text() for page in pypdf.PdfReader(io.BytesIO(data)).pages]


def test_signature_and_quoted_reply_are_dropped() -> None:
    mail = "Hallo Frau Weiß,\n\nbitte unterschreiben.\n\n> Am Montag schrieb sie:\n> alt\n-- \n" \
           "Jürgen Groß\nTel. 030 1\n"
    assert cover_text(mail) == "Hallo Frau Weiß,\n\nbitte unterschreiben."


def test_signature_delimiter_without_trailing_space_also_ends_the_text() -> None:
    assert cover_text("Text\n--\nSignatur") == "Text"


def test_a_dash_line_inside_the_text_is_not_a_signature() -> None:
    assert cover_text("a\n--- \nb\n-- x") == "a\n---\nb\n-- x"


def test_crlf_trailing_space_and_blank_runs_are_tidied() -> None:
    assert cover_text("\r\n\r\nEins  \r\n\r\n\r\n\r\nZwei\r\n\r\n\r\n") == "Eins\n\nZwei"


def test_a_mail_of_only_quotes_and_signature_has_no_cover_text() -> None:
    assert cover_text("> zitiert\n>> noch mehr\n-- \nGruß") == ""


def test_cover_holds_the_first_line_umlauts_and_the_page_total() -> None:
    text = cover_text("Sehr geehrte Frau Müller,\n\nanbei 1.234 € für die Straße.\n-- \nSig")
    cover = render_cover(info(text, document_pages=3), "de", TEMPLATES)
    assert cover.pages == 1
    assert cover.filename == COVER_FILENAME
    [page] = page_texts(cover.data)
    assert "Sehr geehrte Frau Müller," in page
    assert "1.234 € für die Straße." in page
    assert "Jürgen Groß" in page
    assert "Seite 1 von 4" in page  # the cover plus the three document pages
    assert "Sig" not in page


def test_english_cover_uses_the_english_template() -> None:
    cover = render_cover(info("Please sign.", document_pages=1), "en", TEMPLATES)
    [page] = page_texts(cover.data)
    assert "Page 1 of 2" in page
    assert "Subject" in page and "Betreff" not in page


def test_unknown_language_falls_back_to_english() -> None:
    [page] = page_texts(render_cover(info("x"), "fr", TEMPLATES).data)
    assert "Page 1 of 3" in page


def test_long_text_continues_on_more_cover_pages_counted_in_the_total() -> None:
    paragraph = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 30
    text = "Erste Zeile mit Ärger\n\n" + "\n\n".join([paragraph] * 25)
    cover = render_cover(info(text, document_pages=2), "en", TEMPLATES)
    pages = page_texts(cover.data)
    assert cover.pages == len(pages) > 1
    total = cover.pages + 2
    for number, page in enumerate(pages, start=1):
        assert f"Page {number} of {total}" in page
    assert f"{total} including {cover.pages} cover pages" in pages[0]


def test_markup_and_control_characters_in_the_mail_are_shown_not_obeyed() -> None:
    text = "<b>fett?</b> & </cover> \x00\x07 ok"
    cover = render_cover(info(text, subject="<title>x</title> & co"), "en", TEMPLATES)
    [page] = page_texts(cover.data)
    assert "<b>fett?</b> & </cover> ok" in page
    assert "<title>x</title> & co" in page


def test_a_very_long_word_is_wrapped_not_cut() -> None:
    url = "https://example.com/" + "a" * 400
    cover = render_cover(info(url), "en", TEMPLATES)
    [page] = page_texts(cover.data)
    assert page.replace("\n", "").count("a" * 40) >= 9  # all 400 letters are on the page


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="needs poppler-utils")
def test_cover_is_black_on_white_at_fax_resolution(tmp_path: Path) -> None:
    """Rendered at 204×98 dpi grey levels, almost every pixel is clearly black or white."""
    from PIL import Image

    pdf = tmp_path / "cover.pdf"
    pdf.write_bytes(render_cover(info("Grüße aus Köln"), "de", TEMPLATES).data)
    subprocess.run(["pdftoppm", "-rx", "204", "-ry", "98", "-gray", str(pdf), str(tmp_path / "p")],
                   check=True)
    [image_path] = tmp_path.glob("p*.pgm")
    histogram = Image.open(image_path).histogram()
    dark, light = sum(histogram[:64]), sum(histogram[192:])
    assert dark > 2000  # there is real ink on the page
    assert (dark + light) / sum(histogram) > 0.985
