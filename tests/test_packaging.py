"""setup.cfg lists its packages by hand (``find:`` would also install a top-level ``cli``):
every package folder in the tree must be in that list, or a non-editable install drops it."""
import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    packages = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    dirs = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, path = line.partition("=")
        dirs[name.strip()] = path.strip()
    return packages, dirs


def _on_disk(top, prefix):
    found = set()
    for here, subdirs, files in os.walk(os.path.join(ROOT, top)):
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        if "__init__.py" in files:
            rel = os.path.relpath(here, os.path.join(ROOT, top))
            found.add(prefix if rel == "." else prefix + "." + rel.replace(os.sep, "."))
    return found


def test_every_package_folder_is_declared():
    packages, dirs = _declared()
    want = _on_disk("topkattn", "topkattn") | _on_disk(dirs["topkattn.cli"], "topkattn.cli")
    assert "topkattn.decoding" in want  # the walk sees subpackages
    assert want - packages == set(), f"missing from setup.cfg [options] packages: {sorted(want - packages)}"
    assert packages - want == set(), f"declared but not on disk: {sorted(packages - want)}"
