"""PDF and DOCX: text extracted in memory (pypdf, python-docx); nothing is written to disk."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

from appliance.vault.readers import Ident, ReadError, Record, open_input, split_long


def read_pdf(path: Path, ident: Ident | None = None) -> Iterator[Record]:
    import logging

    import pypdf  # ~0.2 s import; only when a PDF is ingested
    from pypdf.errors import PdfReadError

    # pypdf logs what it repairs ("EOF marker not found") to stderr, where it stood beside the one error line; a
    # log line can quote the file, too. A PDF it cannot read is reported as one ReadError.
    logging.getLogger("pypdf").setLevel(logging.ERROR)

    try:
        with open_input(path, ident) as f:
            reader = pypdf.PdfReader(f)
            if reader.is_encrypted:
                raise ReadError("PDF is encrypted; decrypt it first")
            pages = [(p.extract_text() or "").strip() for p in reader.pages]
            title = (reader.metadata.title if reader.metadata else None) or path.stem
    except ReadError:
        raise
    except (PdfReadError, OSError, ValueError, KeyError, TypeError) as e:
        raise ReadError(f"unreadable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(p for p in pages if p)
    if not text.strip():
        raise ReadError("PDF has no extractable text (scanned images need OCR)")
    for i, piece in enumerate(split_long(text)):
        yield Record(kind="pdf", source=str(path), text=piece, title=str(title),
                     meta={"pages": len(pages), "part": i} if i else {"pages": len(pages)})


def read_docx(path: Path, ident: Ident | None = None) -> Iterator[Record]:
    import docx  # python-docx, lxml underneath

    try:
        with open_input(path, ident) as f:
            doc = docx.Document(f)
    except ReadError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ReadError(f"unreadable DOCX ({type(e).__name__}: {e})") from None
    except Exception as e:  # python-docx raises its own PackageNotFoundError and lxml errors
        raise ReadError(f"unreadable DOCX ({type(e).__name__}: {e})") from None
    blocks = [p.text for p in doc.paragraphs if p.text.strip()]
    for table in doc.tables:
        for row in table.rows:
            blocks.append(" | ".join(c.text.strip() for c in row.cells))
    text = "\n".join(blocks)
    if not text.strip():
        raise ReadError("DOCX has no text")
    title = doc.core_properties.title or path.stem
    for i, piece in enumerate(split_long(text)):
        yield Record(kind="docx", source=str(path), text=piece, title=title, meta={"part": i} if i else {})
