"""Fail the image build when an installed package differs from constraints.txt.

    python docker/check_pins.py constraints.txt

Every package of the constraints file that is installed must have exactly its pinned version
(a local label such as ``+cpu`` aside): proof that no pip step replaced what an earlier one
installed (e.g. numpy 2.4.x with torch, then 2.2.6 from requirements.txt). Stdlib only.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str] | None = None) -> int:
    path = (argv or sys.argv[1:] or ["constraints.txt"])[0]
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    installed: dict[str, str] = {}
    for d in md.distributions():  # in sys.path order: the first of a name is the one imported
        installed.setdefault(norm(d.metadata["Name"]), d.version)
    wrong = [f"{n}=={installed[n]} (pinned {v})" for n, v in sorted(pins.items())
             if n in installed and installed[n].split("+", 1)[0] != v]
    if wrong:
        print("installed versions differ from " + path + ": " + ", ".join(wrong), file=sys.stderr)
        return 1
    count = sum(n in installed for n in pins)
    print(f"{count} installed packages match {path} (numpy {installed.get('numpy', '-')}, "
          f"torch {installed.get('torch', '-')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
