"""The pieces of `pd`'s argument parser that every command shares: its help formatter and the adder of
subcommands with their common arguments (`flows.cli` declares the commands)."""
from __future__ import annotations

import argparse

FORMATS = ("table", "json", "csv")


class Help(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each optional argument's default after its help (none for
    required arguments, flags and those whose help says what happens without them)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        d = action.default
        unset = d is None or d is False or d == [] or d == argparse.SUPPRESS
        if not unset and not action.required and action.option_strings and "default" not in text:
            text += f" (default: {d if d != '' else repr(d)})"
        return text


class Commands:
    """Adds subcommands to the parser `pd` reads, with the arguments several of them share."""

    def __init__(self, sub):
        from flows.profiles import PROFILES
        from pd_data.tasks import TASKS

        self.sub, self.profiles = sub, sorted(PROFILES)
        self.forward_modalities = sorted({t.target for t in TASKS.values() if t.source == "image"})  # two-step editing

    def command(self, name: str, help: str, fn):
        p = self.sub.add_parser(name, help=help, description=help, formatter_class=Help)
        p.set_defaults(fn=fn)
        return p

    @staticmethod
    def overrides(p) -> None:
        from flows.profiles import OVERRIDE_RULE

        p.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="set one configuration value (repeatable: -o train.steps=5 -o train.batch_size=2 sets both). "
                            f"{OVERRIDE_RULE} `pd profile NAME` shows every value")

    @staticmethod
    def table_format(p) -> None:
        p.add_argument("--format", default="table", choices=FORMATS, help="output: an aligned table, JSON objects or CSV")
