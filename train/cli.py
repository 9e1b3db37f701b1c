"""Command-line flags generated from a config dataclass, shared by fastbert-prepare, -pretrain and -finetune.

    parser = argparse.ArgumentParser(prog="fastbert-finetune")
    add_config_arguments(parser, FinetuneConfig, choices={"task": TASKS})
    cfg = FinetuneConfig(**vars(parser.parse_args(argv)))

Each field `max_seq_len: int = 128  # 128 for phase 1` becomes `--max-seq-len INT` with that trailing comment
(and any comment-only continuation lines indented past one space after the `#`) as its help text, followed by
the default. `bool` fields get `--x / --no-x`; `T | None` fields take the word `none` for None.

Caution: only `bool`, `int`, `float`, `str` and their `| None` forms are supported (other fields must be
excluded and added by hand); `from __future__ import annotations` is fine (hints are resolved).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Collection, Mapping

_FIELD = re.compile(r"^\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.*?)\s*$")
_CONTINUATION = re.compile(r"^\s*#\s{2,}(\S.*?)\s*$")  # "#" then an aligned run of spaces, not a section title


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the dataclass source, joined with its continuation lines."""
    helps: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m:
            last = m.group(1)
            helps[last] = m.group(2)
            continue
        m = _CONTINUATION.match(line)
        if m and last is not None:
            helps[last] += " " + m.group(1)
        else:
            last = None
    return helps


def optional(kind: type) -> Callable[[str], object]:
    """An argparse `type` for `kind | None`: the word `none` (any case) gives None."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    suppress_defaults: bool = False,
    choices: Mapping[str, Collection[str]] | None = None,
    exclude: Collection[str] = (),
) -> None:
    """Add one `--field-name` flag per field of the dataclass `cls` (fields in `exclude` skipped).

    With `suppress_defaults`, a flag not given is absent from the parsed namespace (argparse.SUPPRESS), so
    that layered defaults (presets) are not overwritten by the dataclass's; the help still shows the
    dataclass default. `choices` restricts the values of the named fields.
    """
    hints = typing.get_type_hints(cls)
    helps = field_comments(cls)
    choices = choices or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        is_optional = type(None) in args
        kind = next(a for a in args if a is not type(None)) if is_optional else hint
        if kind not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {hint}; exclude it and add it by hand")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict = {"default": argparse.SUPPRESS if suppress_defaults else default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in choices:
            kwargs.update(choices=list(choices[f.name]), type=optional(kind) if is_optional else kind)
        else:
            kwargs.update(type=optional(kind) if is_optional else kind, metavar=kind.__name__.upper())
        action = parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
        text = f"{helps.get(f.name, '')} (default: {default})".strip()
        # Set after construction: Python < 3.12's BooleanOptionalAction appends its own "(default: ...)".
        action.help = text.replace("%", "%%")  # argparse %-formats help strings
