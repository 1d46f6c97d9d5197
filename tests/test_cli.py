"""The ``medlens`` command line as a whole: cheap to import, every group listed in the
help, one-line errors with exit code 2. (Each command's own behaviour is tested with its
subsystem: test_pipeline, test_training, test_calibrate, test_evaluation, test_retrieval,
test_api, test_audit.)"""

from __future__ import annotations

import json
import subprocess
import sys

import typer
from typer.testing import CliRunner

from medlens.cli import app

# What `import medlens.cli` and `medlens --help` must not load (seconds of start-up each).
HEAVY = (
    "torch",
    "scipy",
    "numpy",
    "fastapi",
    "uvicorn",
    "streamlit",
    "qdrant_client",
    "transformers",
    "open_clip",
    "sklearn",
)

GROUPS = {
    "analyze": [],
    "samples": [],
    "train": ["align"],
    "calibrate": [],
    "eval": [],
    "index": [],
    "search": [],
    "cache": ["info", "prune"],
    "serve": [],
    "ui": [],
    "demo": [],
    "keys": ["create", "revoke", "list"],
    "audit": ["list", "show", "export", "verify"],
}

runner = CliRunner()


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    return [m for m in HEAVY if m in loaded]


def test_import_cli_loads_no_heavy_module() -> None:
    assert _loaded_after("import medlens.cli") == []


def test_help_loads_no_heavy_module() -> None:
    code = (
        "from medlens.cli import app\n"
        "for args in (['--help'], ['analyze', '--help'], ['train', 'align', '--help']):\n"
        "    try:\n"
        "        app(args, prog_name='medlens')\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert _loaded_after(code) == []


def test_help_lists_every_command_group() -> None:
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    listed = {line.strip("│ ").split(" ")[0] for line in res.output.splitlines()}
    assert set(GROUPS) <= listed
    for group, subs in GROUPS.items():
        if not subs:
            continue
        res = runner.invoke(app, [group, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert all(f" {sub} " in res.output for sub in subs), res.output


def test_settings_parameter_is_not_an_option() -> None:
    """friendly() hands the commands their Settings; Typer must not see the parameter."""

    def walk(cmd) -> list[str]:
        names = [p.name for p in cmd.params]
        for sub in getattr(cmd, "commands", {}).values():
            names += walk(sub)
        return names

    assert "settings" not in walk(typer.main.get_command(app))


def test_bad_path_is_one_line_and_exit_2(tmp_path) -> None:
    res = runner.invoke(app, ["analyze", str(tmp_path / "nope.png")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], res.output
    assert "Traceback" not in res.output


def test_bad_environment_is_one_line_and_exit_2(tmp_path) -> None:
    """Settings are read when a command starts, inside the one-line error handling."""
    res = runner.invoke(app, ["keys", "list"], env={"MEDLENS_MAX_BYTES": "lots"})
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "MEDLENS_MAX_BYTES" in lines[0], res.output


def test_python_m_entry_points() -> None:
    for module in ("medlens.cli", "medlens.ui"):
        res = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        assert "Usage:" in res.stdout


def test_default_datasets_come_from_the_knowledge_packs() -> None:
    """One list: the packs' ``training_datasets`` (the CLI, training and calibration)."""
    from medlens.cli.train import _dataset_names
    from medlens.knowledge import training_datasets
    from medlens.training.align import AlignConfig

    skin = ("ham10000", "derm7pt", "pad_ufes_20", "dermnet")
    expected = (*skin, "covid_chestxray", "pneumoniamnist")
    assert training_datasets() == expected
    assert _dataset_names(None) == expected == AlignConfig().data
    assert _dataset_names("a, b,") == ("a", "b")


def test_api_launcher_runs_the_cli() -> None:
    from medlens.api.launch import api_command

    cmd = api_command("127.0.0.1", 8123, "lite")
    assert cmd[1:4] == ["-m", "medlens.cli", "serve"]
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[-2:] == ["--model", "lite"]


def test_bad_environment_for_the_service_commands() -> None:
    """serve, ui and demo read their ports from the environment: one line, exit 2."""
    for command, var in (("serve", "MEDLENS_API_PORT"), ("ui", "MEDLENS_UI_PORT"),
                         ("demo", "MEDLENS_API_PORT")):  # fmt: skip
        res = runner.invoke(app, [command], env={var: "abc"})
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and var in lines[0] and "Traceback" not in res.output


def test_port_in_use_is_one_line_and_exit_2() -> None:
    """A real `medlens serve` / `medlens ui` on a port something listens on: no SIGABRT."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for command in ("serve", "ui"):
            res = subprocess.run(
                [sys.executable, "-m", "medlens.cli", command, "--port", port],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert res.returncode == 2, (command, res.returncode, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "already in use" in lines[0], res.stderr
            assert "terminate called" not in res.stderr


def test_ui_refuses_a_non_loopback_address_without_a_proxy(monkeypatch) -> None:
    from medlens.api.launch import free_port
    from medlens.cli.service import _ui_process
    from medlens.config import Settings

    res = runner.invoke(app, ["ui", "--host", "0.0.0.0"], env={"COLUMNS": "300"})
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "MEDLENS_UI_BEHIND_PROXY" in lines[0], res.output
    monkeypatch.setenv("MEDLENS_UI_BEHIND_PROXY", "1")  # the operator declares the proxy
    port = free_port("0.0.0.0")
    cmd, _ = _ui_process(None, "0.0.0.0", port, Settings())
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--server.port") + 1] == str(port)
