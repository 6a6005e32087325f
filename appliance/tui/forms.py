"""Dialogs: a small form (text, password, choice fields) and a confirmation that shows a report first."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static


@dataclass
class Field:
    name: str
    label: str
    kind: str = "text"  # text | password | choice
    choices: list[str] = field(default_factory=list)
    value: str = ""


class FormDialog(ModalScreen[dict | None]):
    """Fields in a column, OK and Cancel; dismissed with {name: value} or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, fields: list[Field], ok: str = "OK"):
        super().__init__()
        self.title_text, self.fields, self.ok = title, fields, ok

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="title")
            for f in self.fields:
                yield Label(f.label)
                if f.kind == "choice":
                    yield Select([(c, c) for c in f.choices], value=f.value if f.value in f.choices else Select.BLANK,
                                 id=f"f-{f.name}", allow_blank=not f.value, compact=True)
                else:
                    yield Input(f.value, password=f.kind == "password", id=f"f-{f.name}", compact=True)
            with Horizontal(classes="buttons"):
                yield Button(self.ok, variant="primary", id="ok", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def values(self) -> dict:
        out = {}
        for f in self.fields:
            w = self.query_one(f"#f-{f.name}")
            v = w.value
            out[f.name] = "" if v is Select.BLANK or v is None else str(v)
        return out

    @on(Button.Pressed, "#ok")
    @on(Input.Submitted)
    def submit(self) -> None:
        self.dismiss(self.values())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    """A report to read, then Confirm or Cancel."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, report: str, ok: str = "Confirm"):
        super().__init__()
        self.title_text, self.report, self.ok = title, report, ok

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="title")
            with VerticalScroll(classes="report"):
                yield Static(self.report, markup=False)
            with Horizontal(classes="buttons"):
                yield Button(self.ok, variant="primary", id="ok", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    @on(Button.Pressed, "#ok")
    def confirm(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(False)
