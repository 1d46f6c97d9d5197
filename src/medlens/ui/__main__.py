"""``python -m medlens.ui [--host H] [--port P] [--api-url URL]``: ``medlens ui`` for
containers. Streamlit replaces this process, so signals reach it directly."""

from medlens.cli.service import ui_exec_main

if __name__ == "__main__":
    ui_exec_main()
