"""CoDA's sanitizer of HumanEval answers: the longest parsable span, then only what the entry point reaches.

The rules (CoDA's evaluation, `evaluation/lm_eval/lm_eval/tasks/humaneval/sanitize_utils.py` of
SalesforceAIResearch/CoDA), reimplemented here:

1. Tabs become four spaces, line endings become "\\n", the text is stripped and ends with one "\\n".
2. Of the first 100 lines, the contiguous span of lines that parses as Python and has the most
   non-blank lines is kept; of equally long spans, the one starting first (then ending first).
3. Of that span's top-level statements only these survive: every import; every class; every
   function that contains a `return` anywhere in its body (others are dropped, even the entry
   point); every assignment whose first target is a plain name. A later definition of a name
   replaces an earlier one in the earlier one's place.
4. A definition's dependencies are the names it mentions and the attribute names it reads; the
   value an attribute is read from is not followed (`helpers.clean(x)` depends on `clean` and
   `x`, not `helpers`). The definitions reachable from the entry point are kept.
5. The result is the imports, then the kept definitions, each re-rendered by `ast.unparse`
   (so comments are gone), one after another.

Everything else (prose, top-level asserts and calls, `if __name__` blocks, prints) is dropped.
The text is only parsed, never run.
"""

from __future__ import annotations

import ast

MAX_LINES = 100


def normalise_text(text: str) -> str:
    text = text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n")
    return text.strip() + "\n"


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):  # ValueError: a null byte in the text
        return False
    return True


def longest_parsable_span(text: str) -> str:
    """The span of the first `MAX_LINES` lines that parses and has the most non-blank lines.

    Spans are tried in order of first line, then last line, and one replaces the best so far only
    with strictly more non-blank lines; spans that could not do so are not parsed at all.
    """
    lines = text.splitlines()[:MAX_LINES]
    nonblank_before = [0]
    for line in lines:
        nonblank_before.append(nonblank_before[-1] + bool(line.strip()))
    best, best_count = "", 0
    for first in range(len(lines)):
        if nonblank_before[-1] - nonblank_before[first] <= best_count:
            break  # no span starting here or later can beat the best
        for last in range(first, len(lines)):
            count = nonblank_before[last + 1] - nonblank_before[first]
            if count <= best_count:
                continue
            span = "\n".join(lines[first:last + 1])
            if parses(span):
                best, best_count = span, count
    return best


def _has_return(node: ast.AST) -> bool:
    return any(isinstance(inner, ast.Return) for inner in ast.walk(node))


def top_level_definitions(module: ast.Module) -> tuple[list[ast.stmt], dict[str, ast.stmt]]:
    """(imports, {name: definition}) of a module's body, as rule 3 keeps them."""
    imports: list[ast.stmt] = []
    definitions: dict[str, ast.stmt] = {}
    for node in module.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, ast.ClassDef) or (isinstance(node, ast.FunctionDef) and _has_return(node)):
            definitions[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
    return imports, definitions


def mentioned_names(node: ast.AST) -> set[str]:
    """The names and attribute names a definition mentions (rule 4)."""
    names: set[str] = set()
    pending = [node]
    while pending:
        for child in ast.iter_child_nodes(pending.pop()):
            if isinstance(child, ast.Name):
                names.add(child.id)
            elif isinstance(child, ast.Attribute):
                names.add(child.attr)
            else:
                pending.append(child)
    return names


def reachable_names(entry_point: str, definitions: dict[str, ast.stmt]) -> set[str]:
    dependencies = {name: mentioned_names(node) for name, node in definitions.items()}
    reached, frontier = set(), [entry_point]
    while frontier:
        name = frontier.pop()
        if name not in reached:
            reached.add(name)
            frontier.extend(dependencies.get(name, set()) - reached)
    return reached


def sanitize(text: str, entry_point: str | None) -> str:
    """The program CoDA's evaluation runs for `text` (rules 1-5); with no entry point, every
    surviving definition is kept."""
    module = ast.parse(longest_parsable_span(normalise_text(text)))
    imports, definitions = top_level_definitions(module)
    keep = reachable_names(entry_point, definitions) if entry_point else set(definitions)
    kept = imports + [node for name, node in definitions.items() if name in keep]
    return "\n".join(ast.unparse(node) for node in kept)
