"""The clinician UI in a real browser: Debian's chromium driven by Playwright.

The test starts the API and the Streamlit UI itself on free loopback ports, uploads a
real sample image, waits for the triage banner and the differential chart, saves
build/artifacts/ui.png (docs/screenshots/ui.png is a copy) and stops both processes.
A second test types a free-text query into the explanation panel, waits for its
overlay, moves the opacity slider and saves build/artifacts/ui_explain.png
(docs/screenshots/ui_explain.png is a copy).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from medlens.api import launch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A build artefact (build/ is git-ignored); docs/screenshots/ui.png is a copy.
SCREENSHOT = Path(__file__).resolve().parents[1] / "build" / "artifacts" / "ui.png"
EXPLAIN_SCREENSHOT = SCREENSHOT.with_name("ui_explain.png")
SAMPLE = "isic2018-task3-test/images/ISIC_0034524.jpg"
# A query worded unlike any knowledge-pack text: the pack's melanoma description names a
# "blue-white veil", so an analysis record may rightly hold that phrase; this one must
# never reach the audit trail.
QUERY = "bluish-white haze"


def _require_chromium() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not path:
        pytest.fail(
            "chromium is not installed: run `apt-get update && apt-get install -y chromium` "
            "(the browser test drives Debian's chromium through Playwright)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """API + UI on free loopback ports, with their own MEDLENS_HOME; stopped afterwards."""
    _require_chromium()  # fail before spending a minute on start-up
    home = tmp_path_factory.mktemp("ui_home")
    api_port, ui_port = launch.free_port(), launch.free_port()
    env = {"MEDLENS_HOME": str(home), "MEDLENS_DATA": str(data_dir)}
    env["MEDLENS_API_TIMEOUT_S"] = "600"  # a loaded machine must not turn into a 504
    api = launch.start(
        launch.api_command("127.0.0.1", api_port), env=env, log_file=home / "api.log"
    )
    ui = None
    try:
        ui = launch.start(
            launch.ui_command("127.0.0.1", ui_port),
            env={**env, "MEDLENS_API_URL": f"http://127.0.0.1:{api_port}"},
            log_file=home / "ui.log",
        )
        launch.wait_http_ok(f"http://127.0.0.1:{api_port}/readyz", api, 300, "the API")
        launch.wait_http_ok(f"http://127.0.0.1:{ui_port}/_stcore/health", ui, 300, "the UI")
        yield {"ui": f"http://127.0.0.1:{ui_port}", "home": home}
    finally:
        launch.stop(ui, api)


@pytest.mark.slow
def test_upload_analyze_screenshot(stack: dict, data_dir: Path) -> None:
    chromium = _require_chromium()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(stack["ui"], wait_until="domcontentloaded")
            notice = page.get_by_text("Decision support only — not a diagnosis.", exact=True)
            expect(notice).to_be_visible(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(data_dir / SAMPLE))
            w, h = Image.open(data_dir / SAMPLE).size
            expect(page.get_by_text(f"JPEG {w}×{h}")).to_be_visible(timeout=30_000)  # preview
            page.get_by_role("textbox", name="Symptoms (optional)").fill(
                "itchy, has grown over three months, sometimes bleeds"
            )
            page.get_by_role("button", name="Analyze").click()
            banner = page.locator(".st-key-ml-triage")
            expect(banner).to_contain_text("Triage:", timeout=60_000)
            chart = page.locator(".st-key-ml-differential canvas, .st-key-ml-differential svg")
            expect(chart.first).to_be_visible(timeout=30_000)
            expect(page.get_by_text("Similar cases", exact=True)).to_be_visible()
            expect(page.get_by_text("No case library built yet")).to_be_visible()
            text = banner.inner_text()
            assert any(level in text for level in ("URGENT", "SOON", "ROUTINE")), text
            expect(page.get_by_text("Source: ").first).to_be_visible()
            page.wait_for_timeout(500)  # let the chart finish its transition
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 20_000
    # The analysis went through the API and into the audit trail.
    from medlens.audit import AuditLog

    log = AuditLog(f"sqlite:///{stack['home'] / 'audit.db'}")
    # one analysis; the explanation panel's map for the top finding is audited apart
    analyses = [r for r in log.list(50) if "explanation" not in r.output]
    assert len(analyses) == 1 and analyses[0].input_format == "jpeg"


@pytest.mark.slow
def test_overlay_for_a_typed_query(stack: dict, data_dir: Path) -> None:
    """Upload, analyze, type a query: the panel shows the query's map over the
    image; the opacity slider re-blends it (a new image, no new request needed)."""
    chromium = _require_chromium()
    from playwright.sync_api import expect, sync_playwright

    from medlens.ui.overlay import QUERY_LABEL

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(stack["ui"], wait_until="domcontentloaded")
            expect(
                page.get_by_text("Decision support only — not a diagnosis.", exact=True)
            ).to_be_visible(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(data_dir / SAMPLE))
            page.get_by_role("button", name="Analyze").click()
            expect(page.locator(".st-key-ml-triage")).to_contain_text("Triage:", timeout=60_000)
            expect(page.get_by_text("Where the model looked", exact=True)).to_be_visible(
                timeout=60_000
            )
            overlay = page.locator(".st-key-ml-explain-overlay")
            expect(overlay.locator("img").first).to_be_visible(timeout=120_000)  # top finding
            box = page.get_by_role("textbox", name=QUERY_LABEL)
            box.fill(QUERY)
            box.press("Enter")
            expect(overlay).to_contain_text(f'query "{QUERY}"', timeout=120_000)
            img = overlay.locator("img").first
            expect(img).to_be_visible()
            before = img.get_attribute("src")
            slider = page.get_by_role("slider", name="Overlay opacity")
            slider.focus()
            slider.press("End")  # opacity 1.0: the map alone
            expect(slider).to_have_attribute("aria-valuetext", "1.00", timeout=30_000)
            expect(img).not_to_have_attribute("src", before or "", timeout=60_000)
            slider.press("Home")
            for _ in range(6):  # back to 0.30 for the screenshot
                slider.press("ArrowRight")
            expect(overlay).to_contain_text(f'query "{QUERY}"')
            page.wait_for_timeout(1000)
            overlay.scroll_into_view_if_needed()
            EXPLAIN_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(EXPLAIN_SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert EXPLAIN_SCREENSHOT.stat().st_size > 20_000
    from medlens.audit import AuditLog

    log = AuditLog(f"sqlite:///{stack['home'] / 'audit.db'}")
    explained = [r.output.get("explanation") for r in log.list(50)]
    assert any(e and e["target"] == "query" for e in explained)
    assert all(QUERY not in str(r.output) for r in log.list(50))


def test_screenshot_is_not_a_tracked_file() -> None:
    """`make test` must not rewrite docs/screenshots/ui.png: the screenshot is a build
    artefact in a git-ignored folder (copy it into docs by hand when the UI changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    assert not SCREENSHOT.is_relative_to(root / "docs")
    res = subprocess.run(
        ["git", "check-ignore", "-q", str(SCREENSHOT)], cwd=root, capture_output=True
    )
    assert res.returncode == 0, f"{SCREENSHOT} is not git-ignored"
