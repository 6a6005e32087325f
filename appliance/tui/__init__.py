"""The operator's console (Textual): screens and widgets only, over the same functions the CLI calls.

Nothing outside this package imports it; `appliance tui` loads it on demand.
"""
