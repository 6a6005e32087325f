"""The console app: unlock, then one mode per screen; every action on a key, in the footer and in Ctrl+P."""

from __future__ import annotations

import threading
from functools import partial

from textual.app import App
from textual.command import DiscoveryHit, Hit, Hits, Provider

from appliance import api
from appliance.errors import ApplianceError, VaultBusy, one_line
from appliance.tui import actions
from appliance.tui.audit_screen import AuditScreen
from appliance.tui.bundles_screen import BundlesScreen
from appliance.tui.dashboard import DashboardScreen
from appliance.tui.models_screen import ModelsScreen
from appliance.tui.train_screen import TrainScreen
from appliance.tui.unlock import UnlockScreen
from appliance.tui.vault_screen import VaultScreen


class ActionCommands(Provider):
    """The palette lists the actions of the screen in front, from the same table as the keys."""

    def _items(self):
        screen = self.screen
        mode = getattr(screen, "MODE", None)
        for a in actions.for_screen(mode):
            if self.app.vault is None and a.id != "quit":
                continue
            key = self.app.keymap.get(a.id, a.key)
            yield f"{a.label} ({key})", a, screen

    def _run(self, a: actions.Action, screen) -> None:
        if a.action.startswith("app."):
            self.app.call_later(self.app.run_action, a.action[4:])
        else:
            self.app.call_later(screen.run_action, a.action)

    async def discover(self) -> Hits:
        for text, a, screen in self._items():
            yield DiscoveryHit(text, partial(self._run, a, screen), help=a.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, a, screen in self._items():
            score = max(matcher.match(text), matcher.match(a.help))
            if score > 0:
                yield Hit(score, matcher.highlight(text), partial(self._run, a, screen), help=a.help)


class ApplianceApp(App):
    CSS_PATH = "appliance.tcss"
    TITLE = "appliance"
    MODES = {"dashboard": DashboardScreen, "vault": VaultScreen, "train": TrainScreen, "models": ModelsScreen,
             "bundles": BundlesScreen, "audit": AuditScreen}
    BINDINGS = actions.bindings(None)
    COMMANDS = App.COMMANDS | {ActionCommands}
    COMMAND_PALETTE_BINDING = "ctrl+p"
    # `{action id: key}` from a keys.toml (None: the default file, if any); a bad file is a UsageError. The
    # command line checks `--keys` with it before the console starts.
    load_keymap = staticmethod(actions.load_keymap)

    def __init__(self, home, keymap: dict[str, str] | None = None):  # home: `api.home(path)`
        super().__init__()
        self.home = home
        self.vault = None
        self.keymap = keymap or {}
        self.last_error = ""
        self._vault_lock = threading.Lock()  # one hold on the vault at a time from this process

    def on_mount(self) -> None:
        self.set_keymap(self.keymap)
        self.push_screen(UnlockScreen(self.home))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        # before the unlock, only quitting (and the palette) do anything
        if self.vault is None and action in ("switch_mode", "refresh"):
            return False
        return True

    def unlocked(self, vault) -> None:
        self.vault = vault
        self.switch_mode("dashboard")
        self.recover_jobs()

    def recover_jobs(self) -> None:
        # listing the jobs with write access first recovers orphans and starts what fits, as `jobs list` does
        self.run_worker(lambda: self.with_vault(api.jobs_list, write=True), thread=True, group="jobs")

    # --- the vault, from worker threads -----------------------------------------------------------
    def with_vault(self, fn, write: bool = False, wait: float = 10.0, quiet: bool = False):
        """`fn(vault)` during a brief hold; errors become notifications and the result None.

        `quiet` is for refreshes: they skip their turn (no queue of threads) while other work holds the vault.
        """
        if not self._vault_lock.acquire(blocking=not quiet):
            return None
        try:
            with self.vault.session(read_only=not write, wait=wait) as v:
                return fn(v)
        except VaultBusy as e:
            if not quiet:
                self.call_from_thread(self.report, e)
        except ApplianceError as e:
            self.call_from_thread(self.report, e)
        except OSError as e:  # a file that vanished, a full disk: one line, the console stays up
            self.call_from_thread(self.report, ApplianceError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "),
                                                              "check the path and the disk"))
        finally:
            self._vault_lock.release()
        return None

    def report(self, e: ApplianceError) -> None:
        """The same line the CLI prints, as a notification."""
        self.last_error = one_line(e.message, e.hint, getattr(e, "exit_code", 1))
        self.notify(self.last_error, severity="error", markup=False, timeout=8)

