"""The README's Layout section matches the tree (issue #21): every directory of the repository and of
its packages is named there, and every file, module and directory it names exists."""
import glob
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages whose subdirectories the section names one by one.
PACKAGES = ("vila_edge", "vila_edge_export", "trainers", "models")


def layout_bullets() -> list:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
    return [re.findall(r"`([^`]+)`", b) for b in re.split(r"^- ", section, flags=re.M)[1:]]


def tracked_dirs() -> set:
    """Directories holding files git tracks, so local outputs (a stray engine folder) do not count;
    None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    dirs = set()
    for path in out.splitlines():
        parts = path.split("/")[:-1]
        dirs.update(os.path.join(ROOT, *parts[:i]) for i in range(1, len(parts) + 1))
    return dirs


TRACKED = tracked_dirs()


def directories(path: str) -> list:
    """Subdirectories that hold the project's own files (not caches, build outputs or egg-info)."""
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))
                  and not n.startswith((".", "_")) and not n.endswith(".egg-info") and n != "build"
                  and (TRACKED is None or os.path.join(path, n) in TRACKED))


def exists(name: str, bases: list) -> bool:
    """`name` as a file, directory, module, glob (`onnx_*`) or module.attribute under one of `bases`."""
    for base in bases:
        path = os.path.join(base, name.rstrip("/"))
        if os.path.exists(path) or os.path.exists(path + ".py") or glob.glob(path + ".py"):
            return True
        module, _, attr = name.partition(".")
        if attr.isidentifier() and os.path.isfile(os.path.join(base, module + ".py")):
            with open(os.path.join(base, module + ".py"), encoding="utf-8") as f:
                if re.search(rf"^def {attr}\(", f.read(), re.M):
                    return True
    return False


def test_every_named_path_exists():
    missing = []
    for names in layout_bullets():
        bases = [ROOT]
        for name in names:
            if re.search(r"[\s()]", name):        # commands and calls: `make test`, `Pipeline(checkpoint)`
                continue
            if not exists(name, bases):
                missing.append(name)
            elif name.endswith("/"):               # later names in the bullet may live under it
                bases += [os.path.join(b, name) for b in bases if os.path.isdir(os.path.join(b, name))]
    assert not missing, f"README.md's Layout names what the tree does not have: {missing}"


def test_every_directory_is_named():
    names = [n.rstrip("/") for names in layout_bullets() for n in names]
    named = set(names) | {n.rsplit("/", 1)[0] for n in names if "/" in n}     # `docs/contracts.md` names docs
    unnamed = [d for d in directories(ROOT) if d not in named]
    for package in PACKAGES:
        unnamed += [f"{package}/{d}" for d in directories(os.path.join(ROOT, package))
                    if d not in named and f"{package}/{d}" not in named]
    assert not unnamed, f"README.md's Layout does not name: {unnamed}"
