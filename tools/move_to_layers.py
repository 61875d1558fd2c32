"""One-off: move the flat modules of src/shardkit into the layer subpackages.

    python tools/move_to_layers.py          # git mv + import rewriting, in the working tree
    python tools/move_to_layers.py --check  # only say what would move

Rewrites every import of a moved module in src, tests, bench and tools (relative
imports stay relative, computed from the new places), then every remaining dotted
mention (`shardkit.fill.fill` in a docstring, `"shardkit.execute"` in a test's
monkeypatch). Refuses to run when a flat module has no place in MOVES or KEEP, so a
module added since this script was written is noticed, not left behind.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "src" / "shardkit"

#: old module (under shardkit.) -> new module. Last names stay where code imports the
#: module itself (`from . import header_json`), so no alias is needed.
MOVES = {
    # format: the file formats and the encodings of their elements
    "format": "format.header",
    "header_json": "format.header_json",
    "gc_pause": "format.gc_pause",
    "dtype_cast": "format.dtype_cast",
    "fp8": "format.fp8",
    "torch_checkpoint": "format.torch_checkpoint",
    "torch_pickle": "format.torch_pickle",
    "torch_zip": "format.torch_zip",
    # storage (already a package): where bytes live
    "hub_cache": "storage.hub_cache",
    "readability": "checkpoint.readability",
    # checkpoint: which files hold which tensors, and how a checkpoint is laid out
    "checkpoint": "checkpoint.shards",
    "layers": "checkpoint.layers",
    "layouts": "checkpoint.layouts",
    "manifest": "checkpoint.manifest",
    "variants": "checkpoint.variants",
    "pipeline": "checkpoint.pipeline",
    # plan: pure plans
    "plan": "plan.files",
    "fill": "plan.fill",
    "conversion": "plan.conversion",
    "multipart_plan": "plan.multipart",
    "output_path": "plan.output_path",
    "tensor_bytes": "plan.tensor_bytes",
    "fp8_layout": "plan.fp8_layout",
    "selection": "plan.selection",
    "recipe": "plan.recipe",
    "flux_recipes": "plan.flux_recipes",
    # engine: the only code that writes
    "execute": "engine.execute",
    "execute_s3": "engine.execute_s3",
    "block_writer": "engine.block_writer",
    "byte_copy": "engine.byte_copy",
    "atomic": "engine.atomic",
    "hashing": "engine.hashing",
    "storage.stream": "engine.stream",
    "destination": "engine.destination",
    "source_files": "engine.source_files",
    # checks: equality, manifests, the architecture check
    "compare": "checks.compare",
    "architecture": "checks.architecture",
    "numeric": "checks.numeric",
}

#: Flat modules that stay: the package and its entry point, what every layer shares,
#: and the synthetic checkpoints of the demo and the tests.
KEEP = {"__init__", "__main__", "errors", "sizes", "reports", "version", "synthetic"}

PACKAGE_DOCS = {
    "format": "The safetensors format: header rules, exact JSON, dtype encodings. Imports nothing above it.",
    "checkpoint": "Checkpoints: discover the shards, read the index, cross-check them before any write.",
    "plan": "Pure plans: which tensors go in which file and the steps that make every output byte.",
    "engine": "The only code that writes: blocks, kernel copies, uploads, hashing, atomic commits.",
    "checks": "Checks of what exists: streaming equality, manifests, the architecture check.",
}


def module_path(name: str) -> Path | None:
    base = PKG.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def planned_moves() -> dict[str, str]:
    flat = {p.stem for p in PKG.glob("*.py")}
    unplaced = sorted(flat - set(MOVES) - KEEP)
    if unplaced:
        raise SystemExit(f"no place for: {', '.join(unplaced)}; add them to MOVES or KEEP in {__file__}")
    return {old: new for old, new in MOVES.items() if module_path(old) is not None}


def all_modules() -> set[str]:
    out = set()
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.add(".".join(parts))
    return out


def renamed(name: str, moves: dict[str, str]) -> str:
    """`name` (dotted, below shardkit, "" for the package) after the move."""
    for old in sorted(moves, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return moves[old] + name[len(old):]
    return name


def relative(from_package: list[str], target: list[str]) -> str:
    common = 0
    while common < min(len(from_package), len(target)) and from_package[common] == target[common]:
        common += 1
    return "." * (len(from_package) - common + 1) + ".".join(target[common:])


def rewrite_imports(path: Path, old_module: str | None, moves: dict[str, str], modules: set[str]) -> str:
    """The text of `path` with every shardkit import pointing at the new places.

    `old_module` is the file's own dotted name under shardkit before the move (None for
    files outside the package, whose imports are absolute)."""
    text = path.read_text()
    tree = ast.parse(text, str(path))
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits: list[tuple[int, int, str]] = []
    is_package = path.name == "__init__.py"
    if old_module is not None:
        old_pkg = old_module.split(".") if is_package else old_module.split(".")[:-1]
        old_pkg = [p for p in old_pkg if p]
        new_self = renamed(old_module, moves)
        new_pkg = new_self.split(".") if is_package else new_self.split(".")[:-1]
        new_pkg = [p for p in new_pkg if p]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if old_module is None:
                continue
            base = old_pkg[: len(old_pkg) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        elif node.module == "shardkit" or (node.module or "").startswith("shardkit."):
            origin = node.module.removeprefix("shardkit").removeprefix(".")
        else:
            continue
        groups: dict[str, list[str]] = {}
        for alias in node.names:
            sub = f"{origin}.{alias.name}" if origin else alias.name
            if sub in modules:  # `from pkg import module`
                target = renamed(sub, moves).split(".")
                source, name = target[:-1], target[-1]
                same = alias.asname is None and name == alias.name
                spelled = name if same else f"{name} as {alias.asname or alias.name}"
            else:
                source = [p for p in renamed(origin, moves).split(".") if p]
                spelled = alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
            if node.level and old_module is not None:
                where = relative(new_pkg, source)
            else:
                where = ".".join(["shardkit", *source])
            groups.setdefault(where, []).append(spelled)
        new = [f"from {where} import {', '.join(names)}" for where, names in groups.items()]
        old = ast.get_source_segment(text, node) or ""
        if new == [old]:
            continue
        comments = re.findall(r"#[^\n]*", old)  # a lint directive inside a parenthesised import
        if comments:
            new[0] += "  " + " ".join(comments)
        indent = " " * node.col_offset
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        edits.append((start, end, ("\n" + indent).join(new)))
    # Mentions are rewritten only between the rewritten imports, which are final already.
    out, done = [], 0
    for start, end, replacement in sorted(edits):
        out += [rewrite_mentions(text[done:start], moves), replacement]
        done = end
    out.append(rewrite_mentions(text[done:], moves))
    return "".join(out)


def rewrite_mentions(text: str, moves: dict[str, str]) -> str:
    """Dotted names in strings, docstrings and comments: `shardkit.fill.fill` ->
    `shardkit.plan.fill.fill`; `import shardkit.execute` -> `import shardkit.engine.execute`."""
    names = "|".join(re.escape(old) for old in sorted(moves, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.])shardkit\.({names})(?![\w])")
    return pattern.sub(lambda m: "shardkit." + moves[m.group(1)], text)


def git(*args: str) -> None:
    subprocess.run(["git", *args], cwd=REPO, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    moves = planned_moves()
    for old, new in moves.items():
        print(f"{old:>16} -> {new}")
    if args.check:
        return 0
    modules = all_modules()
    own_names = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        own_names[p] = ".".join(parts)
    texts = {p: rewrite_imports(p, own_names[p], moves, modules) for p in own_names}
    for folder in ("tests", "bench", "tools"):
        for p in (REPO / folder).rglob("*.py"):
            if p.resolve() != Path(__file__).resolve():
                texts[p] = rewrite_imports(p, None, moves, modules)
    for p in [REPO / "Makefile", REPO / "pyproject.toml"]:
        texts[p] = rewrite_mentions(p.read_text(), moves)
    graph_tool = REPO / "tools" / "import_graph.py"
    texts[graph_tool] = "".join(
        line for line in texts.get(graph_tool, graph_tool.read_text()).splitlines(keepends=True)
        if not any(line.startswith(f'    "{old}": ') for old in moves)
    )
    for p, text in texts.items():
        if p.read_text() != text:
            p.write_text(text)
    for package, doc in PACKAGE_DOCS.items():
        init = PKG / package / "__init__.py"
        if not init.exists():
            init.parent.mkdir(exist_ok=True)
            init.write_text(f'"""{doc}"""\n')
            git("add", str(init))
    for old, new in moves.items():
        source = module_path(old)
        target = PKG.joinpath(*new.split(".")).with_suffix(".py")
        target.parent.mkdir(exist_ok=True)
        git("mv", str(source), str(target))
    sort_imports = [sys.executable, "-m", "ruff", "check", "--fix", "--select", "I", "-q"]
    subprocess.run([*sort_imports, "src", "tests", "bench", "tools"], cwd=REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
