"""``spec-train``: not built yet (issue #5). ``spec-pipeline`` runs the stages that exist."""

from __future__ import annotations

import sys


def main() -> None:
    print(
        "spec-train: the train stage is not built yet (issue #5). "
        "Run spec-collect (or spec-pipeline) for the stages that exist.",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main()
