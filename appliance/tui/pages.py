"""What every screen shares: header and footer, a refresh that reads the vault in a worker, error lines."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header


def fill(table: DataTable, rows: list[tuple], keys: list[str] | None = None) -> bool:
    """Show `rows` (with row `keys`, if given) in `table`, unless it shows exactly these already: a refresh that
    changes nothing keeps the cursor, the scroll and the column widths (a cleared table sizes its columns to its
    rows again only when it is next idle, so for a moment it would show them cut). True when it changed."""
    want = [tuple(str(c) for c in r) for r in rows]
    if (keys is None or [str(k.value) for k in table.rows] == keys) and want == [
            tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]:
        return False
    table.clear()
    for i, r in enumerate(rows):
        table.add_row(*r, key=None if keys is None else keys[i])
    return True


class Page(Screen):
    """A screen over the vault. `load(vault)` runs in a thread and returns data; `show(data)` renders it."""

    MODE = ""
    REFRESH_EVERY: float | None = None  # seconds; pages with live data refresh themselves

    def compose_page(self) -> ComposeResult:
        yield from ()

    def compose(self) -> ComposeResult:
        yield Header()
        yield from self.compose_page()
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = self.MODE
        if self.REFRESH_EVERY:
            self.set_interval(self.REFRESH_EVERY, self.action_refresh)

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        if self.app.vault is not None:
            self._reload()

    @work(thread=True, exclusive=True, group="load")
    def _reload(self) -> None:
        data = self.app.with_vault(self.load, wait=2.0, quiet=self.REFRESH_EVERY is not None)
        if data is not None:
            self.app.call_from_thread(self._show, data)

    def _show(self, data) -> None:
        # Every widget a page shows into is composed before its first load, so a query that finds nothing
        # means the page is being taken down (the console quitting while the load ran): drop the data.
        try:
            self.show(data)
        except NoMatches:
            return

    def load(self, vault) -> object:
        return None

    def show(self, data) -> None:
        pass

    def set_text(self, selector: str, text: str) -> None:
        """Update a Static; from a worker, call it through `app.call_from_thread`."""
        self.query_one(selector).update(text)
