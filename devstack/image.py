"""What deploy/Dockerfile puts in the image, read from the Dockerfile itself, and whether that is
everything the processes it runs import.

tests/test_image.py runs :func:`problems` in ``make test`` without building anything: it walks the
imports of every module of the services, the gateway, the operator CLI (``onecard_admin``) and
runtime/ with ``ast``, following first-party imports into runtime/, the SDK packages and the generated code, and
checks each module it reaches against the image:

* a first-party module (one that lives in this repository) must be COPY'd into the runtime stage
  under a directory on the image's PYTHONPATH;
* a third-party module must come from a distribution in requirements.lock that the Dockerfile's
  ``grep -v`` filter keeps and the build stage does not ``pip uninstall``;
* every distribution the image keeps must have its own requirements in the image too (the image
  installs with ``pip --no-deps``, so nothing else would notice a missing one).

Imports under ``if TYPE_CHECKING:`` are not run and are skipped; imports inside functions and
``try: ... except ImportError`` count (the code means to use them). ``importlib.import_module`` of a
string constant counts too. deploy/build-image.sh builds the image and tests/test_image.py's
``ONECARD_IMAGE`` tests run it.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from devstack.config import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
REQUIREMENTS_LOCK = REPO_ROOT / "requirements.lock"
REQUIREMENTS_IN = REPO_ROOT / "requirements.in"
# Where first-party modules live in a checkout, as `make gen`'s .pth file puts them on the path.
SOURCE_ROOTS = (REPO_ROOT, REPO_ROOT / "gen", REPO_ROOT / "sdk" / "python")
# The processes the image runs: `python -m services.<name>`, `python -m gateway`, `onecard-admin`,
# and `python -m runtime.dbroles` (the role bootstrap Job); every module of these is walked.
ENTRY_PACKAGES = ("services", "gateway", "onecard_admin", "runtime")
# The build stage's working directory, where `COPY --from=build /src/gen` takes the generated code.
GENERATED_IN_BUILD = PurePosixPath("/src/gen")


@dataclass
class Image:
    """What the runtime stage of a Dockerfile holds, as far as Python imports go."""

    workdir: PurePosixPath
    python_path: list[PurePosixPath]
    # destination in the image -> source in the repo (COPY from the context or the build stage)
    copies: dict[PurePosixPath, Path]
    # requirements.lock lines the build stage installs (after its grep filter and pip uninstall)
    installed: dict[str, str]
    user: str | None
    base_images: list[str]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _json_or_shell(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _env_pairs(args: str) -> dict[str, str]:
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        if sep:
            pairs[key] = value
    return pairs


def _lock_name(line: str) -> str:
    return canonicalize_name(line.split("==", 1)[0].strip())


def _lock_filter(run: str) -> list[str]:
    """The patterns of a ``grep -v -i -E [-e PATTERN]... requirements.lock`` in a RUN command:
    the lines of requirements.lock they match are left out of the image."""
    tokens = shlex.split(run)
    for start, token in enumerate(tokens):
        if token != "grep" or "-v" not in tokens[start:start + 4]:
            continue
        end = tokens.index("requirements.lock", start)
        options = tokens[start + 1:end]
        if not {"-i", "-E"} <= set(options):
            raise ValueError(f"the requirements filter must be grep -v -i -E: {options}")
        patterns = [options[i + 1] for i, t in enumerate(options) if t == "-e"]
        return patterns or [t for t in options if not t.startswith("-")]
    return []


def read_image(dockerfile_text: str, lock_text: str) -> Image:
    """The runtime stage (the last FROM) of ``dockerfile_text``, with the requirements the build
    stage installs from ``lock_text``."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(dockerfile_text):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
        elif keyword != "ARG":
            raise ValueError(f"{keyword} before the first FROM")
    if len(stages) < 2:
        raise ValueError("expected a build stage and a runtime stage")
    build, runtime = stages[0], stages[-1]

    lock = [line.strip() for line in lock_text.splitlines() if line.strip() and not line.startswith("#")]
    installed = {_lock_name(line): line for line in lock}
    for keyword, args in build:
        if keyword != "RUN":
            continue
        patterns = _lock_filter(args)
        installed = {name: line for name, line in installed.items()
                     if not any(re.search(p, line, re.IGNORECASE) for p in patterns)}
        for names in re.findall(r"pip uninstall (?:--yes |-y )*([\w .-]+?)(?:&&|;|$)", args):
            for name in names.split():
                installed.pop(canonicalize_name(name), None)

    workdir = PurePosixPath("/")
    python_path: list[PurePosixPath] = []
    copies: dict[PurePosixPath, Path] = {}
    user = None
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, args in runtime:
        if keyword == "WORKDIR":
            workdir = workdir / args
        elif keyword == "ENV":
            value = _env_pairs(args).get("PYTHONPATH")
            if value is not None:
                python_path = [workdir / p for p in value.split(":") if p]
        elif keyword == "COPY":
            tokens = shlex.split(args)
            options = [t for t in tokens if t.startswith("--")]
            *sources, dest = [t for t in tokens if not t.startswith("--")]
            target = workdir / dest
            from_build = any(o.startswith("--from=") for o in options)
            for source in sources:
                where = target / PurePosixPath(source).name if dest.endswith("/") and len(sources) > 1 else target
                if from_build:
                    # the build stage's /src mirrors the repo (its gen/ is `make gen`'s); its
                    # /venv is what `installed` describes
                    if PurePosixPath(source).is_relative_to(GENERATED_IN_BUILD.parent):
                        copies[where] = REPO_ROOT / PurePosixPath(source).relative_to(GENERATED_IN_BUILD.parent)
                else:
                    copies[where] = REPO_ROOT / source
        elif keyword == "USER":
            user = args
        elif keyword == "ENTRYPOINT":
            entrypoint = _json_or_shell(args)
        elif keyword == "CMD":
            cmd = _json_or_shell(args)
    base_images = [stage[0][1].split()[0] for stage in stages]
    return Image(workdir=workdir, python_path=python_path, copies=copies, installed=installed,
                 user=user, base_images=base_images, entrypoint=entrypoint, cmd=cmd)


def image_first_party(image: Image) -> dict[str, Path]:
    """Top-level module name -> its source in the repo, for every first-party module that a
    directory on the image's PYTHONPATH holds."""
    modules: dict[str, Path] = {}
    for dest, source in image.copies.items():
        for entry in image.python_path:
            if dest == entry and source.is_dir():
                # a whole directory copied onto the path (the generated code: gen/ -> /app/gen)
                for child in source.iterdir():
                    if child.is_dir() and (child / "__init__.py").exists():
                        modules[child.name] = child
            elif dest.parent == entry:
                modules[dest.name.removesuffix(".py")] = source
    return modules


def repo_first_party() -> set[str]:
    """Every top-level module that lives in this repository (on the dev path)."""
    names = set()
    for root in SOURCE_ROOTS:
        if not root.is_dir():
            continue
        for child in root.iterdir():
            if child.is_dir() and (child / "__init__.py").exists():
                names.add(child.name)
            elif child.suffix == ".py":
                names.add(child.stem)
    return names


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for root in SOURCE_ROOTS:
        base = root.joinpath(*parts)
        if (base / "__init__.py").exists():
            return base / "__init__.py"
        if base.with_suffix(".py").exists():
            return base.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """The absolute dotted names ``source`` imports (``from a import b`` gives ``a`` and ``a.b``;
    ``b`` may be a name rather than a module, which the caller resolves)."""
    tree = ast.parse(source)
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets
                 if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str)}
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
                isinstance(func, ast.Name) and func.id == "import_module")
            if named and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value)
                elif isinstance(arg, ast.Name) and arg.id in constants:
                    names.add(constants[arg.id])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {n for n in names if n}


def _package_modules(package: str) -> Iterator[str]:
    """Every module of a first-party package, by dotted name."""
    init = _module_file(package)
    if init is None:
        raise ValueError(f"no package {package} in the repository")
    root = init.parent
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        parts = [package, *relative.parts]
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts)


@dataclass
class Imports:
    """The walk's result: first-party modules reached, and who imports each top-level name."""

    first_party: set[str] = field(default_factory=set)
    importers: dict[str, set[str]] = field(default_factory=dict)  # top-level name -> modules
    third_party: dict[str, set[str]] = field(default_factory=dict)  # dotted name -> modules


def walk(entries: Iterable[str] = (), extra_sources: Iterable[tuple[str, str]] = ()) -> Imports:
    """Every import reachable from the modules of ``entries`` (default: ENTRY_PACKAGES) and from
    ``extra_sources`` ((module name, source text) pairs), following first-party imports."""
    first_party_tops = repo_first_party()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    result = Imports()
    queue: list[tuple[str, str | None]] = [(m, None) for p in (entries or ENTRY_PACKAGES)
                                           for m in _package_modules(p)]
    queue += list(extra_sources)
    while queue:
        module, text = queue.pop()
        if text is None:
            if module in result.first_party:
                continue
            path = _module_file(module)
            if path is None:
                continue  # `from pkg import name` where name is not a module
            result.first_party.add(module)
            text, is_package = path.read_text(), path.name == "__init__.py"
        else:
            is_package = False
        for name in imported_names(text, module, is_package):
            top = name.split(".")[0]
            if top in stdlib:
                continue
            result.importers.setdefault(top, set()).add(module)
            if top in first_party_tops:
                # the module and its parent packages (importing a.b.c runs a and a.b)
                parts = name.split(".")
                queue += [(".".join(parts[:i]), None) for i in range(1, len(parts) + 1)]
            else:
                result.third_party.setdefault(name, set()).add(module)
    return result


@functools.cache
def distribution_modules() -> dict[str, set[str]]:
    """Dotted module or package name -> the installed distributions (canonical names) that hold
    it, read from this environment's installed files (requirements.lock installs every one)."""
    modules: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or ():
            parts = list(file.parts)
            if not parts or parts[0].startswith("..") or ".dist-info" in parts[0] or ".data" in parts[0]:
                continue
            last = parts[-1]
            if not last.endswith((".py", ".so", ".pyd")):
                continue
            parts[-1] = last.split(".")[0]
            if parts[-1] == "__init__":
                parts.pop()
            for i in range(1, len(parts) + 1):
                modules.setdefault(".".join(parts[:i]), set()).add(name)
    return modules


def _providers(name: str, modules: dict[str, set[str]]) -> set[str] | None:
    """The distributions that hold ``name`` (its longest known prefix), or None if none does."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        found = modules.get(".".join(parts[:i]))
        if found:
            return found
    return None


def problems(image: Image, imports: Imports) -> list[str]:
    """Why the image would fail to import what its processes import; empty when it would not."""
    found: list[str] = []
    in_image = image_first_party(image)
    first_party_tops = repo_first_party()
    for top, importers in sorted(imports.importers.items()):
        if top in first_party_tops and top not in in_image:
            found.append(f"first-party {top} (imported by {', '.join(sorted(importers)[:3])}) "
                         f"is not COPY'd onto the image's PYTHONPATH")

    modules = distribution_modules()
    lock_names = {_lock_name(line) for line in REQUIREMENTS_LOCK.read_text().splitlines() if "==" in line}
    for name, importers in sorted(imports.third_party.items()):
        providers = _providers(name, modules)
        who = ", ".join(sorted(importers)[:3])
        if providers is None:
            # `from a import b` where b is a name in a: a's providers answer for it
            if "." in name and _providers(name.rpartition(".")[0], modules):
                continue
            found.append(f"{name} (imported by {who}) comes from no installed distribution")
            continue
        if not providers & set(image.installed):
            if providers & lock_names:
                found.append(f"{name} (imported by {who}) comes from {', '.join(sorted(providers))}, "
                             f"which deploy/Dockerfile leaves out of the image")
            else:
                found.append(f"{name} (imported by {who}) comes from {', '.join(sorted(providers))}, "
                             f"which requirements.lock does not pin")
    found += missing_requirements(image)
    found += left_behind(image)
    return found


def missing_requirements(image: Image) -> list[str]:
    """Distributions the image installs whose own requirements it leaves out (pip --no-deps)."""
    found = []
    environment = {"extra": ""}
    for name in sorted(image.installed):
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} is in requirements.lock but not installed here: run `make gen`")
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if canonicalize_name(requirement.name) not in image.installed:
                found.append(f"{name} requires {requirement.name}, which the image does not install")
    return found


def _requires(name: str) -> set[str]:
    """The distributions ``name`` needs when installed without extras, in this environment."""
    names = set()
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(requirement.name))
    return names


def left_behind(image: Image) -> list[str]:
    """Distributions the image installs only because a package it leaves out needs them (a test
    tool's dependencies): the requirements filter should leave them out too."""
    direct = {canonicalize_name(re.split(r"[\s\[=<>!~;]", line.strip(), maxsplit=1)[0])
              for line in REQUIREMENTS_IN.read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")}
    lock_names = {_lock_name(line) for line in REQUIREMENTS_LOCK.read_text().splitlines() if "==" in line}
    kept = set(image.installed)
    needed = direct & kept
    for name in kept:
        needed |= _requires(name)
    found = []
    for name in sorted(kept - needed):
        owners = sorted(other for other in lock_names - kept if name in _requires(other))
        if owners:
            found.append(f"{name} is in the image only for {', '.join(owners)}, which it leaves out")
    return found


def check(dockerfile_text: str | None = None,
          extra_sources: Iterable[tuple[str, str]] = ()) -> tuple[Image, Imports, list[str]]:
    """Read the Dockerfile (by default deploy/Dockerfile), walk the imports, list the problems."""
    image = read_image(dockerfile_text if dockerfile_text is not None else DOCKERFILE.read_text(),
                       REQUIREMENTS_LOCK.read_text())
    imports = walk(extra_sources=extra_sources)
    return image, imports, problems(image, imports)


if __name__ == "__main__":
    _, walked, listed = check()
    print(f"{len(walked.first_party)} first-party modules, "
          f"{len({n.split('.')[0] for n in walked.third_party})} third-party top-level modules")
    for line in listed:
        print(line)
    sys.exit(1 if listed else 0)
