"""The shape of the code, checked: stages import one way, no cycles, lazy imports only for heavy packages, short functions.

Read from the source with ``ast`` (nothing is imported), so a violation is
reported with its file and line even when it would also break at import time.
The rules are the ones ``pipeline/__init__.py`` states.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pipeline's stages, bottom up: a module may import its own stage and the ones before it.
STAGES = ["core", "tflite", "model", "conversion", "validation", "demo"]

# Packages imported inside functions on purpose, and why.
LAZY_OK = {
    "tensorflow": "2-3 s to import; --help, the device runner and .tflite-only paths must not pay it",
    "keras": "imports TensorFlow",
    "tf_keras": "imports TensorFlow; only QAT and tf_keras sources need it",
    "tensorflow_model_optimization": "imports TensorFlow and may switch the process to Keras 2 (tfmot_import)",
    "tensorflow_text": "optional, TensorFlow",
    "matplotlib": "0.5 s to import; only the HTML reports draw plots",
    "ai_edge_litert": "native libraries; the device runner may use another interpreter",
    "tflite_runtime": "optional interpreter, only on devices",
    "h5py": "only for .h5 weights files",
    "sklearn": "0.8 s to import; only the digits data needs it",
    "absl": "TensorFlow's logging, touched only when TensorFlow is loaded",
    "mediapipe": "optional client, only for the parity check",
    "onnx": "bench peer only",
    "onnxruntime": "bench peer only",
    "tf2onnx": "bench peer only",
    "resource": "Unix-only; imported where a child process limits itself",
}

# Functions longer than MAX_LINES, each with the reason it stays whole.
MAX_LINES = 60
LONG_OK = {
    "pipeline/model/xception.py:build_xception": "the paper's architecture as one straight readable builder, "
                                                  "top to bottom as in Keras's own applications/xception.py",
}


def project_files() -> list[Path]:
    files = [ROOT / "convert.py"]
    for package in ("pipeline", "calibrate", "devices"):
        files += sorted(p for p in (ROOT / package).rglob("*.py") if not p.name.startswith(("test_", "conftest")))
    return files


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, child.lineno, in_function))
                # ``from pipeline.core import artifacts`` imports the module pipeline.core.artifacts
                found.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def parsed() -> dict[str, tuple[Path, ast.AST]]:
    return {module_name(p): (p, ast.parse(p.read_text(), filename=str(p))) for p in project_files()
            if module_name(p) not in GENERATED}


def project_edges(modules) -> dict[str, set[str]]:
    """module -> the project modules it imports (at any level), keeping only names that are modules."""
    edges = {}
    for name, (_, tree) in modules.items():
        edges[name] = {m for m, _, _ in imports(tree) if m in modules and m != name}
    return edges


def stage_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return STAGES.index(parts[1]) if parts[1] in STAGES else None


def test_stages_import_only_earlier_stages():
    modules = parsed()
    wrong = []
    for name, (path, tree) in modules.items():
        top = name.split(".")[0]
        for target, line, _ in imports(tree):
            if target not in modules:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            target_top = target.split(".")[0]
            if name == "devices.runner":
                wrong.append(f"{where} (the device runner is copied to devices alone: it imports nothing of ours)")
            elif top == "pipeline" and target_top != "pipeline":
                wrong.append(f"{where} (the library imports no CLI, calibrate/ or devices/ code)")
            elif top in ("calibrate", "devices") and target_top not in (top, "pipeline"):
                wrong.append(f"{where} ({top}/ imports only itself and pipeline/)")
            elif top == "pipeline" and name != "pipeline":
                mine, theirs = stage_of(name), stage_of(target)
                if theirs is not None and mine is not None and theirs > mine:
                    wrong.append(f"{where} (stage {STAGES[mine]} must not import the later stage {STAGES[theirs]})")
    assert not wrong, "imports against the stage order:\n" + "\n".join(wrong)


def test_every_pipeline_module_belongs_to_a_stage():
    loose = [name for name in parsed() if name.startswith("pipeline.") and stage_of(name) is None]
    assert not loose, f"modules outside the stages of pipeline/__init__.py: {loose}"


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the cycle it closes (``a -> b -> a``)."""
    cycles, state, stack = [], {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(project_edges(parsed()))
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(cycles)


# The CLI imports each command's code when that command runs: `convert --help` then answers in 0.1 s instead of
# 0.5-0.8 s with every library module loaded (measured on the 2-core machine). Nothing imports convert.py, so
# these imports hide no cycle (test_no_import_cycles counts them too).
LAZY_MODULES_OK = {
    "convert": "the CLI's commands load their library code on use, keeping --help instant",
    "devices.runner": "runs alone on boards down to Python 3.7, where importlib.metadata may be missing (tried)",
    "pipeline": "the facade: every `import pipeline.x` runs pipeline/__init__.py first, so its entry points load "
                "their stage when first used; nothing in the library imports the facade, so no cycle hides there",
}
# Generated code, vendored unchanged: not ours to shape.
GENERATED = {"pipeline.tflite.metadata_schema_py_generated"}


def test_function_level_imports_are_only_heavy_packages():
    wrong = {}
    for name, (path, tree) in parsed().items():
        if name in LAZY_MODULES_OK:
            continue
        for target, line, in_function in imports(tree):
            root = target.split(".")[0]
            if not in_function or root in LAZY_OK:
                continue
            why = "hides a cycle" if root in ("pipeline", "devices", "calibrate", "convert") else "not a heavy package"
            wrong.setdefault(f"{path.relative_to(ROOT)}:{line}", f"imports {target} inside a function ({why})")
    assert not wrong, "function-level imports:\n" + "\n".join(f"{k} {v}" for k, v in sorted(wrong.items()))


def test_no_private_names_imported_across_modules():
    wrong = []
    for name, (path, tree) in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "pipeline", "devices", "calibrate", "convert"):
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_")]
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)


# TensorFlow's Python packages: pipeline/tflite/ works on .tflite bytes with LiteRT alone.
TENSORFLOW = ("tensorflow", "keras", "tf_keras", "tensorflow_model_optimization")
# Packages whose private names (``_get_ops_details``, ``tensorflow.lite.python``) may change in any release.
UPSTREAM = TENSORFLOW + ("ai_edge_litert", "tflite_runtime")
# The modules that read those private names, each behind its own version check with the stock path as fallback.
PRIVATE_API_OK = {
    "pipeline.conversion.converter_hooks": "TensorFlow's converter internals, pinned to one TensorFlow version",
    "pipeline.tflite.runtime": "LiteRT's per-node view, pinned to one ai-edge-litert version (in the tflite stage: "
                               "pipeline/tflite/ may not import the conversion stage)",
    "devices.runner": "copied to devices alone and run on whatever interpreter is there; reads the per-node view "
                      "where it exists and reports no node counts where it does not",
}
# Private names of other owners, read on purpose.
OTHER_PRIVATE_OK = {
    "convert.py: atexit._run_exitfuncs": "the standard library's exit handlers, run before os._exit "
                                        "(convert.exit_without_teardown: the measured reason is there)",
}
STDLIB_PRIVATE_OK = {"os._exit"}


def private_api_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each import of an upstream package's internals and each ``obj._name`` read on an object
    other than ``self``/``cls`` (upstream objects are not typed, so every such read counts)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                f"{node.module}.{a.name}" for a in node.names] if node.module and not node.level else []
            for module in modules:
                parts = module.split(".")
                if parts[0] in UPSTREAM and any(p == "python" or (p.startswith("_") and not p.startswith("__"))
                                                for p in parts[1:]):
                    found.append((node.lineno, f"import {module}"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                text = ast.unparse(node)
                if text not in STDLIB_PRIVATE_OK:
                    found.append((node.lineno, text))
    return sorted(found)


def test_tflite_stage_never_imports_tensorflow():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for name, (path, tree) in parsed().items() if name.startswith("pipeline.tflite")
             for target, line, _ in imports(tree) if target.split(".")[0] in TENSORFLOW]
    assert not wrong, "pipeline/tflite/ runs on LiteRT alone, without TensorFlow:\n" + "\n".join(wrong)


def test_private_upstream_names_only_behind_the_pins():
    wrong = []
    for name, (path, tree) in parsed().items():
        if name in PRIVATE_API_OK:
            continue
        rel = str(path.relative_to(ROOT))
        wrong += [f"{rel}:{line} {what}" for line, what in private_api_uses(tree)
                  if f"{rel}: {what}" not in OTHER_PRIVATE_OK]
    assert not wrong, ("private TensorFlow/LiteRT names outside the pinned modules (route them through "
                       "pipeline/conversion/converter_hooks.py or pipeline/tflite/runtime.py):\n" + "\n".join(wrong))


def test_functions_fit_in_a_readers_head():
    long = []
    files = [p for p in project_files() if module_name(p) not in GENERATED] + sorted((ROOT / "bench").glob("*.py"))
    for path in files:
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{rel}:{node.name}"
                if lines > MAX_LINES and key not in LONG_OK:
                    long.append(f"{rel}:{node.lineno} {node.name} is {lines} lines")
    assert not long, f"functions over {MAX_LINES} lines (split them, or give a reason in LONG_OK):\n" + "\n".join(long)


def test_the_checks_see_a_violation(tmp_path):
    """The walker finds function-level imports and cycles in code written to have them."""
    tree = ast.parse("import os\n\ndef f():\n    from pipeline.core import errors\n    import json\n")
    assert imports(tree) == [("os", 1, False), ("pipeline.core", 4, True), ("pipeline.core.errors", 4, True),
                             ("json", 5, True)]
    assert stage_of("pipeline.tflite.splice") == 1 and stage_of("pipeline.validation.validate") == 4
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    private = ast.parse("from tensorflow.lite.python import lite\nimport tensorflow.python.framework\n"
                        "from ai_edge_litert import interpreter\n"
                        "def f(it, x):\n    it._get_ops_details()\n    self._ok = x._cache\n    return it.__dict__\n")
    assert private_api_uses(private) == [(1, "import tensorflow.lite.python.lite"),
                                         (2, "import tensorflow.python.framework"),
                                         (5, "it._get_ops_details"), (6, "x._cache")]


# The library says what is wrong; only the CLI names the flag that fixes it (pipeline/core/errors.py:Remedy).
# devices/runner.py is the device-side script with its own command line, so its messages name its own flags.
FLAG_IN_MESSAGE_OK = {"devices/runner.py"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def flags_in_raised_messages(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, flag) for each command-line flag written in the message of a ``raise``, or in a module constant
    whose name says it is a hint (``*_HINT``), since those end up in raised messages too."""
    found = []
    for node in ast.walk(tree):
        texts: list[ast.AST] = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            texts = [node.exc]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("HINT")
                                                  for t in node.targets):
            texts = [node.value]
        for text in texts:
            for part in ast.walk(text):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found += [(part.lineno, flag) for flag in FLAG.findall(part.value)]
    return found


def test_library_messages_name_no_command_line_flags():
    named = []
    for path in project_files():
        rel = str(path.relative_to(ROOT))
        if rel == "convert.py" or rel in FLAG_IN_MESSAGE_OK:
            continue
        flags = flags_in_raised_messages(ast.parse(path.read_text()))
        named += [f"{rel}:{line} {flag}" for line, flag in flags]
    assert not named, ("library error messages name command-line flags; raise with setting= or remedy= "
                       "(pipeline/core/errors.py) and let convert.py word the flag:\n" + "\n".join(named))


def test_the_flag_walker_sees_a_flag():
    assert flags_in_raised_messages(ast.parse('X_HINT = "use --ab"\nraise E(f"bad {x}; pass --out-dir")\n')) == [
        (1, "--ab"), (2, "--out-dir")]
