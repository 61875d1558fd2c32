"""Print shardkit's module import graph and fail on an import circle or an upward import.

    python tools/import_graph.py            # the graph by layer, then the findings
    python tools/import_graph.py --layers   # only which layer imports which
    python tools/import_graph.py --quiet    # only the findings (what `make lint` runs)

Every import counts, also one inside a function or under `if TYPE_CHECKING:`: a lazy
import keeps start-up fast but is still a dependency, and a circle through one is still
a circle. Importing a submodule also runs its package's `__init__`; that implicit edge
is not counted (it is how packages work), only the imports the code writes.

The layers, lowest first, are the rows of `LAYERS`. A module may import modules of its
own layer or of a lower one. Modules in a layer subpackage (`shardkit/plan/...`) are in
that layer; a module outside one is placed by `PLACED` (the flat tree before the move).
Exit status: 0 clean, 1 findings.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "shardkit"

#: Lowest first. `base` holds what every layer may use: the exception family, sizes, the
#: report dataclasses, the version.
LAYERS = ("base", "format", "storage", "checkpoint", "plan", "engine", "checks", "commands", "cli", "api")

#: Layer of each module that is not inside a layer subpackage (module name without `shardkit.`).
PLACED = {
    "__init__": "api",
    "__main__": "api",
    "errors": "base",
    "sizes": "base",
    "reports": "base",
    "version": "base",
    "synthetic": "api",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The shardkit modules `name` imports, resolved to the most specific known module."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def known(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = known(alias.name)
                    if target:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if not (origin == PACKAGE or origin.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                # `from pkg import sub` imports the submodule; `from mod import name` the module.
                target = known(f"{origin}.{alias.name}") if f"{origin}.{alias.name}" in modules else known(origin)
                if target:
                    found.add(target)
    found.discard(name)
    return found


def layer_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    rest = ".".join(parts[1:]) or "__init__"
    if rest in PLACED:
        return PLACED[rest]
    raise SystemExit(f"{name}: in no layer; put it in a layer subpackage or in PLACED in {__file__}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def short(name: str) -> str:
    return name.removeprefix(PACKAGE + ".") if name != PACKAGE else "(shardkit)"


def findings(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    out = []
    for component in cycles(graph):
        out.append("import circle: " + " <-> ".join(short(m) for m in component))
    for name in sorted(graph):
        for target in sorted(graph[name]):
            if rank[layer_of(target)] > rank[layer_of(name)]:
                out.append(
                    f"upward import: {short(name)} ({layer_of(name)}) imports "
                    f"{short(target)} ({layer_of(target)})"
                )
    return out


def print_graph(graph: dict[str, set[str]], layers_only: bool) -> None:
    by_layer: dict[str, list[str]] = {layer: [] for layer in LAYERS}
    for name in sorted(graph):
        by_layer[layer_of(name)].append(name)
    for layer in LAYERS:
        members = by_layer[layer]
        if not members:
            continue
        uses = sorted({layer_of(t) for m in members for t in graph[m]} - {layer}, key=LAYERS.index)
        print(f"[{layer}] uses: {', '.join(uses) or '-'}")
        if layers_only:
            continue
        for name in members:
            print(f"  {short(name)} -> {', '.join(short(t) for t in sorted(graph[name])) or '-'}")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", action="store_true", help="only which layer uses which")
    parser.add_argument("--quiet", action="store_true", help="only the findings")
    args = parser.parse_args(list(argv) if argv is not None else None)
    modules = discover()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    if not args.quiet:
        print_graph(graph, args.layers)
        print()
    problems = findings(graph)
    for line in problems:
        print(line)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(problems)} finding(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
