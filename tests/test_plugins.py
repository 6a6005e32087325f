"""Site plugins: custom eval metrics and GRPO rewards load through one registry (appliance/plugins.py), so
the same mistake in either is the same one line: which plugin, what is wrong, what to do."""

from __future__ import annotations

import textwrap

import pytest

from appliance.errors import UsageError, one_line
from appliance.plugins import PluginError, Registry

KINDS = {"metrics": ("eval metric", "APPLIANCE_EVAL_PLUGINS"), "rewards": ("reward", "APPLIANCE_REWARD_PLUGINS")}


def _load(which: str) -> None:
    if which == "metrics":
        from appliance.eval.metrics import load_plugins
    else:
        from appliance.train.rewards import load_plugins
    load_plugins()


def _refusal(which: str, monkeypatch, modules: str) -> PluginError:
    monkeypatch.setenv(KINDS[which][1], modules)
    with pytest.raises(PluginError) as got:
        _load(which)
    return got.value


def _generic(which: str, e: PluginError) -> str:
    """The line with the plugin kind and variable taken out: what must be the same for both."""
    kind, env = KINDS[which]
    return one_line(e.message, e.hint, e.exit_code).replace(kind, "KIND").replace(env, "ENV")


def _boom(tmp_path, monkeypatch) -> None:
    (tmp_path / "site_boom.py").write_text("raise RuntimeError('no licence file\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("which", sorted(KINDS))
def test_a_missing_plugin_is_one_line(which, monkeypatch):
    e = _refusal(which, monkeypatch, "site_nowhere")
    kind, env = KINDS[which]
    assert isinstance(e, UsageError) and e.exit_code == 2
    assert e.message == f"{kind} plugin site_nowhere failed to load: ModuleNotFoundError: No module named " \
                        "'site_nowhere'"
    assert e.hint == f"check the module name in {env} and that its directory is on PYTHONPATH"


@pytest.mark.parametrize("which", sorted(KINDS))
def test_a_plugin_that_raises_on_import_is_one_line(which, tmp_path, monkeypatch):
    _boom(tmp_path, monkeypatch)
    e = _refusal(which, monkeypatch, " site_boom ")  # names are trimmed, as before
    kind, env = KINDS[which]
    assert e.message == f"{kind} plugin site_boom failed to load: RuntimeError: no licence file"
    assert e.hint == f"fix the module, or remove it from {env}"
    assert "\n" not in one_line(e.message, e.hint, e.exit_code)


def test_the_same_mistake_reads_the_same_for_metrics_and_rewards(tmp_path, monkeypatch):
    _boom(tmp_path, monkeypatch)
    for modules in ("site_nowhere", "site_boom", "json, site_nowhere"):
        lines = {_generic(w, _refusal(w, monkeypatch, modules)) for w in KINDS}
        assert len(lines) == 1, lines


def test_the_ways_in_report_it_the_same(home, cli, tmp_path, monkeypatch):
    """`eval run` (before the vault is opened) and a GRPO recipe's check both say it as the loaders do."""
    from appliance.train.config import GrpoConfig

    monkeypatch.setenv("APPLIANCE_EVAL_PLUGINS", "site_nowhere")
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent("""\
        [[case]]
        prompt = "x"
        expect = "contains"
        answer = "y"
        """))
    r = cli("--home", home, "eval", "run", suite, "--model", "m@1")
    e = _refusal("metrics", monkeypatch, "site_nowhere")
    assert (r.code, r.err.strip()) == (2, one_line(e.message, e.hint, 2))
    monkeypatch.setenv("APPLIANCE_REWARD_PLUGINS", "site_nowhere")
    with pytest.raises(PluginError) as got:
        GrpoConfig(rewards=["overlap"]).problems()
    assert _generic("rewards", got.value) == _generic("metrics", e)


WIDGETS = Registry("widget", "APPLIANCE_TEST_WIDGETS")


def test_a_registry_registers_and_loads(tmp_path, monkeypatch):
    @WIDGETS.register("one")
    def one():
        return 1

    (tmp_path / "site_widgets.py").write_text("from tests.test_plugins import WIDGETS\n"
                                              "WIDGETS.register('two')(lambda: 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("APPLIANCE_TEST_WIDGETS", "site_widgets,,")
    WIDGETS.load()
    assert WIDGETS.modules() == ["site_widgets"] and {k: f() for k, f in WIDGETS.items()} == {"one": 1, "two": 2}
