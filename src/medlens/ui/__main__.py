"""``python -m medlens.ui [--host H] [--port P] [--api-url URL]``: the Streamlit UI.

Replaces this process with Streamlit (so signals reach it directly, as containers need).
"""

from __future__ import annotations

import argparse
import os
import sys

from medlens.api.launch import ui_command
from medlens.config import get_settings


def main() -> None:
    s = get_settings()
    ap = argparse.ArgumentParser(prog="python -m medlens.ui", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=s.ui_port)
    ap.add_argument("--api-url", default=s.api_url)
    args = ap.parse_args()
    os.environ["MEDLENS_API_URL"] = args.api_url
    cmd = ui_command(args.host, args.port, s.api_max_upload_bytes // 2**20)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
