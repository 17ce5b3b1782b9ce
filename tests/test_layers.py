"""The package's imports go downward: no module imports one of a higher layer, and no two modules import each other
(directly or round a longer loop). Every import counts, top-level or inside a function: a deferred import still
ties the two modules together. The layers are those of DESIGN.md and the README's layout paragraph."""

from __future__ import annotations

import ast
from pathlib import Path

import gptforge

PACKAGE = Path(gptforge.__file__).parent

# Module (or package: it covers its submodules) -> layer, lowest first. The longest matching name decides.
LAYERS = {
    # 1: no gptforge imports but these
    "errors": 1, "config": 1, "settings": 1, "hardware": 1, "tokenizer": 1, "chat_template": 1, "corpora": 1,
    "outputs": 1,
    # 2: the model and the data it reads; numerics
    "model": 2, "data": 2, "fastencode": 2, "optim": 2, "precision": 2,
    # 3: formats and device plumbing
    "checkpoint": 3, "distributed": 3, "hf": 3, "gguf": 3, "native": 3,
    # 4: transforms of a built model
    "compress": 4, "compress.quantize": 4, "compress.prune": 4, "finetune": 4, "finetune.lora": 4,
    "finetune.head": 4, "finetune.data": 4,
    # 5: checkpoint -> ready model
    "loader": 5,  # not "load": that name is the package's own gptforge.load(), which a submodule would shadow
    # 6: what runs a model: the loop, decoding, planning, evaluation, and the verbs built on them
    "train": 6, "sampling": 6, "kvcache": 6, "prefix_cache": 6, "text": 6, "generate": 6, "engine": 6, "plan": 6, "eval": 6,
    "compress.evaluate": 6, "compress.distill": 6, "compress.run": 6, "finetune.run": 6, "curate": 6,
    "interop": 6, "gguf_export": 6,
    # 7: services and reports over those
    "serve": 7, "bench": 7, "report": 7, "demo": 7,
    # 8: entry points (the package's own __init__ is the library facade: gptforge.load lazily imports generate)
    "cli": 8, "__main__": 8, "": 8,
}

# Imports that break the order today, each with the work that removes it. Keep this list exact: the test fails
# when an edge here is gone, so that its line goes too.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports anywhere in its file (names relative to the package)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upward
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(["gptforge", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule sub when there is one, else a name of pkg
            targets = [f"{mod}.{a.name}" if (f"{mod}.{a.name}".removeprefix("gptforge.")) in known else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == "gptforge" or t.startswith("gptforge."):
                rel = t.removeprefix("gptforge").removeprefix(".")
                while rel not in known and "." in rel:  # `import gptforge.a.b.c` where c is a name, not a module
                    rel = rel.rsplit(".", 1)[0]
                if rel != name:
                    out.add(rel)
    return out


def layer(name: str) -> int:
    best = max((k for k in LAYERS if k == "" or name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m and not any(m == k or m.startswith(k + ".") for k in LAYERS if k)]
    assert not unplaced, f"add these modules to LAYERS (and to DESIGN.md's layer list): {unplaced}"


def test_no_module_shadows_the_package_api():
    """Importing a submodule sets the package's attribute of that name: a `gptforge/load.py` would replace
    `gptforge.load()` as soon as anything imported it."""
    assert not [name for name in gptforge.__all__ if name in modules()]


def test_no_import_goes_up_a_layer():
    up = {(a, b) for a, targets in graph().items() for b in targets if layer(b) > layer(a)}
    unexpected = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in up - set(ALLOWED))
    assert not unexpected, "imports up the layers:\n" + "\n".join(unexpected)
    stale = sorted(set(ALLOWED) - up)
    assert not stale, f"these ALLOWED edges are gone; delete them from the list: {stale}"


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: each is an import cycle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert strongly_connected(graph()) == []


def test_the_walk_sees_in_function_and_relative_imports(tmp_path):
    """The walker itself: deferred, `from pkg import module` and relative imports all count."""
    (tmp_path / "sub").mkdir()
    src = tmp_path / "sub" / "a.py"
    src.write_text("def f():\n    from gptforge import load\n    from . import b\n    import gptforge.config as c\n")
    known = {"load", "config", "sub.a", "sub.b", "sub"}
    assert imported("sub.a", src, known) == {"load", "sub.b", "config"}
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
