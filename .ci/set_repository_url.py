#!/usr/bin/env python3
"""The extension's repository URL lives in one place: ``scm_url`` of ISTNRegistration.json.

Slicer's ExtensionsIndex reads literal URLs (its checker greps CMakeLists.txt
for ``set(EXTENSION_ICONURL "http...")`` and wants a repository name that
contains "Slicer"), so the URL is spelled out in a few files. This script
keeps them in step:

    python .ci/set_repository_url.py https://github.com/OWNER/SlicerISTNRegistration   # rewrite every copy
    python .ci/set_repository_url.py                                                   # check (exit 1 if out of step)

It needs nothing but the standard library (CI runs the check; Testing/test_slicer_static.py too).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATALOG_ENTRY = REPO / "ISTNRegistration.json"
#: Every file that spells the repository URL (or its owner, as the contributors' organisation).
FILES = ("ISTNRegistration.json", "CMakeLists.txt", "ISTNRegistration/ISTNRegistration.py", "README.md",
         "docs/slicer.md")
URL = re.compile(r"https://(?:github\.com|raw\.githubusercontent\.com)/([\w.-]+)/([\w.-]+?)(?:\.git)?(?=[/\"'\s)]|$)")
CONTRIBUTORS = re.compile(r"ISTN Registration maintainers \(([\w.-]+)\)")


def current() -> tuple[str, str]:
    """(owner, repository name) of ``scm_url``."""
    match = URL.match(json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))["scm_url"])
    if match is None:
        raise SystemExit(f"{CATALOG_ENTRY.name}: scm_url is not a GitHub https URL")
    return match.group(1), match.group(2)


def mismatches(owner: str, name: str) -> list[str]:
    """Lines of `FILES` that link to this project under another owner or name (or name another organisation)."""
    found = []
    for relative in FILES:
        text = (REPO / relative).read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            for match in URL.finditer(line):
                ours = "istnregistration" in match.group(2).lower().replace("-", "").replace("_", "")
                if ours and (match.group(1), match.group(2)) != (owner, name):  # links to other projects are fine
                    found.append(f"{relative}:{number}: {match.group(0)}")
            for match in CONTRIBUTORS.finditer(line):
                if match.group(1) != owner:
                    found.append(f"{relative}:{number}: {match.group(0)}")
    return found


def rewrite(new_url: str) -> None:
    match = URL.match(new_url.rstrip("/"))
    if match is None:
        raise SystemExit("give the repository as https://github.com/OWNER/NAME")
    owner, name = match.group(1), match.group(2)
    if "slicer" not in name.lower():
        raise SystemExit(f"the ExtensionsIndex requires 'Slicer' in the repository name (e.g. Slicer{name})")
    old_owner, old_name = current()
    for relative in FILES:
        path = REPO / relative
        text = path.read_text(encoding="utf-8")
        for host in ("github.com", "raw.githubusercontent.com"):
            text = text.replace(f"https://{host}/{old_owner}/{old_name}", f"https://{host}/{owner}/{name}")
        text = text.replace(f"ISTN Registration maintainers ({old_owner})", f"ISTN Registration maintainers ({owner})")
        path.write_text(text, encoding="utf-8")


def main(argv: list[str]) -> int:
    if argv:
        rewrite(argv[0])
    owner, name = current()
    bad = mismatches(owner, name)
    for line in bad:
        print(f"not https://github.com/{owner}/{name}: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
