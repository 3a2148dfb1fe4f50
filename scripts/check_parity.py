"""Parity of our SV3D port with the original reference on a fixture folder (sv3d_tiny format).

    python scripts/check_parity.py --fixture ../shared/fixtures/sv3d_tiny [--variant sv3d_u sv3d_p]

Prints the max abs and relative error of every check; exits 0 only when all pass (single forwards within
2e-5 max abs, final frames within 1e-4), 1 otherwise, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import sys

from sv3d.errors import Sv3dError
from sv3d.model.parity import run_parity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fixture", required=True, help="folder with tiny_*.safetensors/.yaml and ref_* files"
    )
    parser.add_argument("--variant", nargs="+", default=["sv3d_u", "sv3d_p"], choices=["sv3d_u", "sv3d_p"])
    args = parser.parse_args()
    failed = 0
    for variant in args.variant:
        print(f"== {variant}")
        try:
            checks = run_parity(args.fixture, variant)
        except Sv3dError as exc:
            print(f"check_parity: error: {exc}", file=sys.stderr)
            return 2
        for check in checks:
            print(check.line())
        failed += sum(not c.passed for c in checks)
    print("all checks passed" if not failed else f"{failed} checks FAILED")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
