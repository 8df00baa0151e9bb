"""The code's contracts, checked from its files: no import cycle, one place that creates TS objects and
one that keeps method facts, no private names imported across modules, a solver's attributes
declared by its class, and a path page (docs/architecture.md) whose file and function names exist."""

import ast
import inspect
import os
import re

import pytest
import torch

import pnode

PNODE_DIR = os.path.dirname(os.path.abspath(pnode.__file__))
REPO = os.path.dirname(PNODE_DIR)


def _modules():
    """``{dotted name: path}`` of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PNODE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def _imports(name: str, path: str, modules) -> set:
    """The package's modules that module ``name`` imports, at any level of its code (functions too)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            for alias in node.names:
                targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_module_imports_another_s_private_names():
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("pnode")):
                offenders += [f"{name}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
    assert not offenders, offenders


def test_one_place_creates_ts_objects():
    creators = [name for name, path in _modules().items() if re.search(r"\bTS\(\)\.create\(", open(path).read())]
    assert creators == ["pnode._impl.ts_setup"]


# PETSc TS types and RK tableaus: a literal collection of two or more of them is a method fact
_METHOD_NAMES = {"rk", "euler", "ssp", "arkimex", "theta", "cn", "beuler", "1fe", "2a", "3bs", "4", "5dp", "5bs"}


def _method_facts(path: str):
    """Lines of ``path`` with a tuple, list, set or dict literal of two or more TS types or RK tableaus."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.Tuple, ast.List, ast.Set)) else []
        names = [item.value for item in items if isinstance(item, ast.Constant) and item.value in _METHOD_NAMES]
        if len(names) >= 2:
            found.append((node.lineno, names))
    return found


def test_one_place_keeps_method_facts():
    keepers = {name: facts for name, path in _modules().items() if not name.startswith("pnode.testing")
               for facts in [_method_facts(path)] if facts}
    assert list(keepers) == ["pnode._impl.methods"], keepers


def test_a_solver_has_the_attributes_its_class_declares_and_no_others():
    from pnode._impl.pool import acquire_solver, release_solver
    from pnode._impl.problem import check_inputs

    y0 = torch.ones(3, dtype=torch.float64, requires_grad=True)
    for options in ({}, {"memory_budget": "1MB"}, {"checkpoints": 2, "step_size": 0.1}):
        ys = pnode.odeint_adjoint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), method="rk4" if options else "dopri5",
                                  options=options, adjoint_params=())
        ys[-1].sum().backward()
    problem = check_inputs(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), 1e-6, 1e-6, "dopri5", None, None)
    key, solver = acquire_solver(problem, 0, True)
    try:
        assert not hasattr(solver, "__dict__")  # __slots__: writing an undeclared attribute raises
        with pytest.raises(AttributeError):
            solver.measured_costs = None
    finally:
        release_solver(key, solver)


def _defined_names() -> set:
    """Every module-level function, class, class method and assigned name of the package, and
    ``Class.method`` for methods."""
    names = set()
    for path in _modules().values():
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        names.update({item.name, f"{node.name}.{item.name}"})
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        names.add(target.id)
    return names


def test_the_architecture_page_names_files_and_functions_that_exist():
    with open(os.path.join(REPO, "docs", "architecture.md")) as fh:
        text = fh.read()
    paths = set(re.findall(r"pnode/[a-z_/]+\.py", text))
    assert paths and all(os.path.exists(os.path.join(REPO, p)) for p in paths), paths
    diagram = text.split("```")[1]
    named = set(re.findall(r"\b[A-Za-z_]+(?:\.[A-Za-z_]+)?\b", " ".join(
        line.split("pnode/")[-1].split(None, 1)[1] for line in diagram.splitlines()
        if "pnode/" in line and len(line.split("pnode/")[-1].split(None, 1)) > 1)))
    named |= {m for m in re.findall(r"`([A-Za-z_]+(?:\.[A-Za-z_]+)?)`", text) if not m.endswith(".py")}
    public = {"odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "ODEBlock"}
    public |= {name for name in _modules() if "_impl" not in name}  # the public modules by name
    missing = sorted(n for n in named - public if n not in _defined_names()
                     and n not in {"TSSolve", "TSAdjointSolve", "func", "y0", "t"})
    assert not missing, missing


def test_the_public_surface_is_the_documented_one():
    # users import pnode, pnode.distributed, pnode.allocator (and pnode.testing in tests); the rest is
    # pnode._impl, and no public function or class takes a private keyword
    top = sorted(name for name in os.listdir(PNODE_DIR) if name.endswith(".py") or
                 os.path.isfile(os.path.join(PNODE_DIR, name, "__init__.py")))
    assert top == ["__init__.py", "_compat.py", "_impl", "allocator.py", "distributed.py", "testing"]
    for name in pnode.__all__:
        obj = getattr(pnode, name)
        if callable(obj) and not (isinstance(obj, type) and issubclass(obj, Exception)):
            private = [p for p in inspect.signature(obj).parameters if p.startswith("_")]
            assert not private, (name, private)


def test_readme_fits_200_lines_with_install_and_example_on_its_first_screen():
    lines = open(os.path.join(REPO, "README.md")).read().splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:40])
    for needed in ("bash scripts/demo.sh", "bash scripts/test.sh", "pip install -e '.[petsc]'",
                   "from pnode import odeint_adjoint", ".backward()", "docs/architecture.md"):
        assert needed in first_screen, needed
