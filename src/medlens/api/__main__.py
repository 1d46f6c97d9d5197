"""``python -m medlens.api --host 127.0.0.1 --port 8000``: the service without the CLI
(used by ``medlens demo``, the browser test and the load benchmark)."""

from __future__ import annotations

import argparse
import sys

from medlens.errors import MedLensError


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m medlens.api", description=__doc__)
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    from medlens.api.server import serve

    try:
        serve(
            args.host, args.port, model=args.model, workers=args.workers, log_level=args.log_level
        )
    except MedLensError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
