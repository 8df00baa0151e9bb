"""Let a second venv import the torch that this interpreter's venv already has, without a copy.

    <source venv>/bin/python scripts/link_torch.py <target venv>

torch 2.14.1 with its CUDA libraries takes about 6 GB; the test venvs for PETSc 3.18 and for a
single-precision PETSc need the same torch but a different PETSc, petsc4py and (3.18) NumPy. This
links, into ``<target venv>/torch-shared/``, the top-level entries (packages and ``.dist-info``
folders) of torch's distribution and of every distribution it requires, and adds a ``.pth`` file that
puts that folder on the target's ``sys.path`` after its own site-packages. pip then sees torch as
installed in the target, and nothing else of the source venv (PETSc, petsc4py, NumPy, pnode) is
visible there. Both interpreters must share the CPython version (the wheels' ABI). Prints what it
linked; exits with status 2, linking nothing, when the versions differ or torch is absent.
"""

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def requirement_closure(root):
    """Names of ``root``'s distribution and of all it requires on this platform (no extras)."""
    from packaging.requirements import Requirement  # pip's vendored copy is not importable

    seen, todo = {}, [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def top_level_entries(dist):
    """The site-packages entries (folders and modules) that ``dist``'s files live under."""
    base = Path(dist.locate_file(""))
    names = {Path(str(f)).parts[0] for f in dist.files or []}
    return sorted(base / n for n in names if n != ".." and not n.endswith(".pth") and n != "__pycache__")


def target_python_version(venv):
    cfg = (venv / "pyvenv.cfg").read_text()
    match = re.search(r"^version(?:_info)?\s*=\s*(\d+)\.(\d+)", cfg, re.M)
    if not match:
        sys.exit(f"[link_torch] {venv}/pyvenv.cfg names no Python version")
    return int(match.group(1)), int(match.group(2))


def main(argv):
    if len(argv) != 1:
        sys.exit(__doc__)
    venv = Path(argv[0]).resolve()
    version = target_python_version(venv)
    if version != sys.version_info[:2]:
        print(f"[link_torch] {venv} runs Python {version[0]}.{version[1]}, this venv "
              f"{sys.version_info[0]}.{sys.version_info[1]}: torch's wheel does not fit it", file=sys.stderr)
        return 2
    try:
        dists = requirement_closure("torch")
    except metadata.PackageNotFoundError as err:
        print(f"[link_torch] {sys.prefix} lacks {err}: nothing to share", file=sys.stderr)
        return 2
    shared = venv / "torch-shared"
    shared.mkdir(exist_ok=True)
    for dist in dists.values():
        for entry in top_level_entries(dist):
            link = shared / entry.name
            if not link.is_symlink():
                link.symlink_to(entry)
    site = venv / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
    (site / "pnode-torch-shared.pth").write_text(f"{shared}\n")
    print(f"[link_torch] {venv.name} imports from {sysconfig.get_paths()['purelib']}: "
          + ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
