"""Every config field with its value and the one-line comment written beside it in ``defaults.py``.

``defaults.py`` stays the one source of defaults and of their meaning: each ``x.field = value  # comment`` line
documents ``field``. This module reads those comments from the file's source (no import-time registry), so
``python -m therapy_rl.main --config X --show_config`` can print the whole config, and a test can fail on a
field that has no comment.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import tokenize
from typing import Any, Iterator

from therapy_rl import defaults

_ROOTS = {"sft": "sft_defaults", "ppo": "ppo_defaults", "eval": "eval_defaults", "repro": "repro_defaults"}


def _trailing_comments(source: str) -> dict[int, str]:
    """line number -> text of a comment that follows code on that line."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if tok.start[0] in code_lines:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    return comments


def _attribute_chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """``c.data.source`` -> ("c", ["data", "source"]); None for anything else."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not names:
        return None
    return node.id, names[::-1]


def _called_docs(value: ast.AST, docs_of: dict[str, dict[str, str]]) -> dict[str, str]:
    """The docs of the first defaults function called in ``value`` (``data_defaults()``, ``unset(data_defaults())``)."""
    for node in ast.walk(value):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and docs_of.get(node.func.id):
            return docs_of[node.func.id]
    return {}


def _function_docs(func: ast.FunctionDef, comments: dict[int, str],
                   docs_of: dict[str, dict[str, str]]) -> dict[str, str]:
    """dotted field path (relative to the ConfigDict the function returns) -> comment; a section's own comment
    (on ``c.x = section()`` or on ``s = ConfigDict()``) is under its path."""
    returned = next((s.value.id for s in func.body if isinstance(s, ast.Return) and isinstance(s.value, ast.Name)),
                    None)
    assigns, local_comments = [], {}
    for stmt in func.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            chain = _attribute_chain(target)
            if chain:
                assigns.append((chain, stmt.value, stmt.lineno))
            elif isinstance(target, ast.Name) and stmt.lineno in comments:
                local_comments[target.id] = comments[stmt.lineno]
    prefix_of: dict[str, str] = {returned: ""} if returned else {}
    changed = True
    while changed:  # a local section's prefix is known once it is assigned into a known one
        changed = False
        for (var, names), value, _ in assigns:
            if var in prefix_of and isinstance(value, ast.Name) and value.id not in prefix_of:
                prefix_of[value.id] = prefix_of[var] + ".".join(names) + "."
                changed = True
    docs: dict[str, str] = {prefix[:-1]: local_comments[var] for var, prefix in prefix_of.items()
                            if prefix and var in local_comments}
    for (var, names), value, line in assigns:
        if var not in prefix_of:
            continue
        path = prefix_of[var] + ".".join(names)
        if isinstance(value, ast.Call):
            docs.update({f"{path}.{k}": v for k, v in _called_docs(value, docs_of).items()})
        if line in comments:
            docs[path] = comments[line]
    return docs


@functools.lru_cache(maxsize=None)
def field_comments(root_function: str) -> dict[str, str]:
    """``{"data.source": "bundled_sample | mesc | …", …}`` for ``defaults.<root_function>()``."""
    path = os.path.abspath(defaults.__file__)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = _trailing_comments(source)
    functions = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    docs_of: dict[str, dict[str, str]] = {}
    for _ in functions:  # again until stable: a helper may be defined after the function that calls it
        before = dict(docs_of)
        docs_of = {node.name: _function_docs(node, comments, docs_of) for node in functions}
        if docs_of == before:
            break
    if root_function not in docs_of:
        raise KeyError(f"defaults.py has no function {root_function!r}")
    return docs_of[root_function]


def leaves(config: Any, prefix: str = "", maps: frozenset[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every field; an empty section, or one named in ``maps``, is a field of its own."""
    items = config.items() if hasattr(config, "items") else ()
    is_section = lambda item: (hasattr(item[1], "items") and len(item[1]) > 0  # noqa: E731
                               and f"{prefix}{item[0]}" not in maps)
    for key, value in sorted(items, key=lambda item: (is_section(item), item[0])):
        name = f"{prefix}{key}"
        if is_section((key, value)):
            yield from leaves(value, name + ".", maps)
        else:
            yield name, value.to_dict() if hasattr(value, "to_dict") else value


def root_function(config) -> str:
    mode = config.get("mode", "sft")
    return _ROOTS.get(mode, f"{mode}_defaults")


@functools.lru_cache(maxsize=None)
def map_fields(root: str) -> frozenset[str]:
    """Fields whose default is an empty section: user maps (``data.esconv_emotion_map``), shown whole."""
    return frozenset(name for name, value in leaves(getattr(defaults, root)()) if value == {})


def describe(config) -> list[tuple[str, Any, str]]:
    """(name, value, comment or "") for every field of a config made from ``defaults.<mode>_defaults()``."""
    root = root_function(config)
    docs = field_comments(root)
    return [(name, value, docs.get(name, "")) for name, value in leaves(config, maps=map_fields(root))]


def uncommented(config) -> list[str]:
    """The fields of ``config`` that have no comment in defaults.py."""
    return [name for name, _, comment in describe(config) if not comment]


def show_config(config) -> str:
    """A readable listing: ``name = value  # comment``, grouped by section (a section's own comment on its
    heading); ``None`` = not set (PPO and evaluation data options: the run's value)."""
    rows = describe(config)
    docs = field_comments(root_function(config))
    width = min(max(len(f"  {n} = {v!r}") for n, v, _ in rows), 70)
    lines, section = [], None
    for name, value, comment in rows:
        head = name.rsplit(".", 1)[0] if "." in name else ""
        if head != section:
            section = head
            heading = f"[{head or 'run'}]"
            lines.append(f"{heading}  # {docs[head]}" if docs.get(head) else heading)
        text = f"  {name} = {value!r}"
        lines.append(f"{text:<{width}}  # {comment or '(no comment)'}")
    return "\n".join(lines)
