"""The shape of the package: no import cycles, a bottom-floor contract module, plug-ins by discovery."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tvkd", "baselines", "studies", "reports")


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def runtime_imports(tree: ast.Module) -> list[tuple[ast.stmt, bool]]:
    """Every import statement that can run, at any depth (module level, try/if, inside functions and
    classes), but not under ``if TYPE_CHECKING:``; each with whether it sits inside a function."""
    out: list[tuple[ast.stmt, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for sub in child.orelse:
                    visit_stmt(sub, in_function)
                continue
            visit_stmt(child, in_function)

    def visit_stmt(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, in_function))
            return
        visit(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def _targets(node: ast.stmt, mod: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    # an ancestor package is always being imported already when its child runs
    ancestor = mod == base or mod.startswith(base + ".")
    return ([] if ancestor else [base]) + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth (inside functions too)."""
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node, _ in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for t in _targets(node, mod, is_pkg):
                if t in mods and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "tvkd.api" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_graph_sees_imports_inside_functions_and_not_type_checking_ones():
    tree = ast.parse(textwrap.dedent("""
        from typing import TYPE_CHECKING
        import a
        if TYPE_CHECKING:
            import b
        def f():
            import c
            class K:
                def g(self):
                    from d import e
    """))
    found = {(ast.unparse(n), inside) for n, inside in runtime_imports(tree)}
    assert found == {("from typing import TYPE_CHECKING", False), ("import a", False), ("import c", True),
                     ("from d import e", True)}


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def package_init_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Importing ``a.b`` runs ``a/__init__.py`` first: a package whose ``__init__`` reaches (at any depth) a
    module outside the package that imports back into it is a cycle the module graph alone does not show."""
    found = []
    for pkg in graph:
        inside = {m for m in graph if m == pkg or m.startswith(pkg + ".")}
        if len(inside) == 1:
            continue
        for out in sorted(_closure(graph, pkg) - inside):
            back = _closure(graph, out) & inside
            if back:
                found.append(f"{pkg}/__init__ reaches {out}, which imports {sorted(back)[0]} back")
    return found


def test_no_cycle_through_a_package_init():
    assert package_init_cycles(import_graph()) == []


def test_a_cycle_through_a_package_init_is_found():
    graph = {"s": {"s.engine"}, "s.engine": {"r"}, "s.spec": set(), "r": {"s.spec"}}
    assert package_init_cycles(graph) == ["s/__init__ reaches r, which imports s.spec back"]


def test_arrows_point_down_between_studies_and_reports():
    """The study format is the bottom of the study layer: reports read it, the engine runs both."""
    graph = import_graph()
    assert not {t for t in graph["studies.spec"] if t.startswith("reports")}, graph["studies.spec"]
    assert not {t for t in graph["studies"] if t.startswith("reports")}, graph["studies"]
    for mod, targets in graph.items():
        if mod.startswith("reports"):
            wrong = {t for t in targets if t.startswith("studies") and t not in ("studies", "studies.spec")}
            assert not wrong, f"{mod} imports {wrong}: reports may depend on the study format only"


def test_function_level_project_imports_in_studies_and_reports_are_documented_lazy_imports():
    """Inside studies/ and reports/ a project import inside a function is there only to defer a heavy
    third-party package (torch, transformers, ray), and says so with a ``# lazy: <what>`` comment."""
    bad = []
    for mod, path in module_files().items():
        if not mod.startswith(("studies", "reports")):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, inside in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            project = any(n.split(".")[0] in PACKAGES for n in names) or (isinstance(node, ast.ImportFrom)
                                                                            and node.level)
            if inside and project and "# lazy:" not in lines[node.lineno - 1]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "\n".join(bad)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_api_is_the_bottom_floor():
    """tvkd.api imports nothing of the project but the registry and the torch-free value checks, at import
    time or inside functions."""
    tree = ast.parse((ROOT / "tvkd" / "api.py").read_text())
    project = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            project.add(node.module)
        elif isinstance(node, ast.Import):
            project |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    assert project == {"tvkd.registry", "tvkd.checks"}


def _run(code: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, **(env or {})})


def test_importing_the_contract_loads_no_plugin():
    out = _run("import sys, tvkd.api; print(json.dumps(sorted(m for m in sys.modules if m.startswith(('tvkd.', 'baselines')))))"
               .replace("import sys", "import sys, json"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["tvkd.api", "tvkd.checks", "tvkd.registry"]


DROP_IN = '''\
"""A loss dropped into baselines/ by a test (IPO, Azar et al. 2023, length-averaged as TRL)."""

from dataclasses import dataclass, field

from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss


@LOSSES.register("{name}", needs="reference log-probs", citation="Azar et al., 2023 (IPO)", reference_free=False)
class DropIn(PreferenceLoss):
    """L = (Δ̄_w − Δ̄_l − 1/(2β))², Δ̄ the length-averaged log-ratio."""

    name = "{name}"

    @dataclass
    class Config:
        beta: float = field(default=0.1, metadata={{"help": "β, the IPO regularisation."}})

    def needs(self, cfg):
        return Needs(reference=True)

    def __call__(self, batch, cfg):
        avg = (batch.sequence_logps() - batch.sequence_ref_logps()) / batch.lengths()
        w, l = batch.split(avg)
        losses = (w - l - 1 / (2 * cfg.beta)) ** 2
        return LossOutput(loss=losses.mean(), metrics={{"loss": losses.detach().mean()}}, margins=(w - l).detach())
'''


def checkout_copy(tmp_path: Path) -> Path:
    """A copy of the checkout's code and tests: files dropped into it touch no other process's run."""
    import shutil

    copy = tmp_path / "checkout"
    for part in (*PACKAGES, "tests", "docs", "pyproject.toml", "README.md"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, copy / part)
    return copy


def _dropped_in(tmp_path: Path) -> tuple[Path, str, dict[str, str]]:
    copy = checkout_copy(tmp_path)
    name = "dropin_ipo"
    (copy / "baselines" / f"{name}.py").write_text(DROP_IN.format(name=name))  # no other file changes
    return copy, name, {**os.environ, "PYTHONPATH": str(copy)}


def test_a_loss_file_dropped_into_baselines_is_found_and_listed(tmp_path):
    copy, name, env = _dropped_in(tmp_path)
    listed = subprocess.run([sys.executable, "-m", "tvkd.cli", "losses"], capture_output=True, text=True,
                            cwd=copy, timeout=300, env=env)
    assert listed.returncode == 0, listed.stderr
    assert f"{name}: Azar et al., 2023 (IPO)" in listed.stdout


@pytest.mark.slow
def test_a_loss_file_dropped_into_baselines_passes_the_contract_tests(tmp_path):
    copy, name, env = _dropped_in(tmp_path)
    contract = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_loss_contract.py", "-k", name], capture_output=True, text=True,
                              cwd=copy, timeout=600, env=env)
    assert contract.returncode == 0, contract.stdout[-3000:]
    summary = contract.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and int(summary.split(" passed")[0].split()[-1]) >= 9, summary


def test_a_plugin_that_fails_to_import_is_an_error_naming_its_file(tmp_path):
    copy = checkout_copy(tmp_path)
    (copy / "baselines" / "broken.py").write_text("import this_module_does_not_exist_anywhere\n")
    env = {"PYTHONPATH": str(copy)}
    out = _run("from tvkd.api import LOSSES; LOSSES.get('dpo')", env=env, cwd=copy)
    assert out.returncode != 0
    assert "baselines/broken.py" in out.stderr and "this_module_does_not_exist_anywhere" in out.stderr
    cli = subprocess.run([sys.executable, "-m", "tvkd.cli", "losses"], capture_output=True, text=True, cwd=copy,
                         timeout=300, env={**os.environ, **env})
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.startswith("error: ") and "broken.py" in cli.stderr


def _installed_package(tmp_path: Path, group: str, entry: str, files: dict[str, str]) -> Path:
    """A package 'installed' into a folder on sys.path, with an entry point (a dist-info, as pip makes)."""
    site = tmp_path / "site"
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / "tvkd_plugin_example-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tvkd-plugin-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    return site


def test_an_installed_entry_point_registers_a_loss(tmp_path):
    name = f"ep_{uuid.uuid4().hex[:8]}"
    site = _installed_package(tmp_path, "tvkd.losses", "example = myplugin.losses",
                              {"myplugin/__init__.py": "", "myplugin/losses.py": DROP_IN.format(name=name)})
    out = _run(f"from tvkd.api import LOSSES; print(LOSSES.where({name!r}))", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "myplugin.losses.DropIn"


#: The README's example names, renamed here: a user who follows the README word for word (the files in
#: baselines/ and tvkd/aux_rewards/) keeps this test green, instead of a clash of two registrations.
README_NAMES = {"dpo_norm": "readme_dpo_norm", "entropy": "readme_entropy"}


def _readme_plugin(tmp_path: Path) -> Path:
    """The README's "Add a loss" and "Add an aux reward" files, copied into a package as a user would."""
    readme = (ROOT / "README.md").read_text()

    def block(heading: str) -> str:
        section = readme.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
        return textwrap.dedent(section.split("```python\n", 1)[1].split("```", 1)[0])

    site = _installed_package(tmp_path, "tvkd.losses", "readme = readme_plugin", {
        "readme_plugin/__init__.py": "",
        "readme_plugin/dpo_norm.py": block("Add a loss").replace('"dpo_norm"', '"readme_dpo_norm"'),
        "readme_plugin/entropy.py": block("Add an aux reward").replace('"entropy"', '"readme_entropy"'),
    })
    (next(site.glob("*.dist-info")) / "entry_points.txt").write_text(
        "[tvkd.losses]\nreadme = readme_plugin\n[tvkd.aux_rewards]\nreadme = readme_plugin\n")
    return site


def test_readme_examples_register_through_discovery(tmp_path):
    env = {"PYTHONPATH": str(_readme_plugin(tmp_path))}
    out = _run("from tvkd.api import LOSSES, AUX_REWARDS; print(LOSSES.where('readme_dpo_norm'), AUX_REWARDS.meta('readme_entropy')['kind'])",
               env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["readme_plugin.dpo_norm.DPONorm", "state"]


@pytest.mark.slow
def test_readme_examples_pass_the_contract_tests(tmp_path):
    env = {"PYTHONPATH": str(_readme_plugin(tmp_path))}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_loss_contract.py", "tests/test_aux_rewards.py", "-k", "readme_dpo_norm or readme_entropy"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **env})
    assert tests.returncode == 0, tests.stdout[-3000:]
    summary = tests.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and int(summary.split(" passed")[0].split()[-1]) >= 10, summary
