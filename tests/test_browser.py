"""Lesson 12's planner in a real browser: JupyterLab in headless Chromium, 1,000 pixels wide.

The test copies the student notebook into a temporary course (its helpers/ and requirements.txt are links to
the real ones; the course tree is never written to), starts JupyterLab there on a free port with a token, and
drives it as a learner would: it runs the set-up cell (the first code cell), an import cell the test adds
after it (the lesson's own import cell also loads and evaluates the model, which the planner does not need),
and the cell that calls ``planner()``, each by selecting it and pressing Shift+Enter. Then it changes the GPU
dropdown and the batch size and checks that the plan's text and chart follow, that the widget has no
horizontal overflow and that no control's description is cut. Screenshots before and after the change go to
$COURSE_BROWSER_SCREENSHOTS (else pytest's tmp_path).

Needs Chromium and its driver (Debian: ``apt-get install -y chromium chromium-driver``) and selenium
(requirements.txt); skipped with the reason when one is missing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from helpers.constants import ROOT

pytestmark = pytest.mark.slow

NOTEBOOK = "12_fit_the_budget.ipynb"
WIDTH, HEIGHT = 1000, 1400  # the window; the notebook is narrower (JupyterLab's sidebars and margins)
STEP = 240  # seconds for one step: JupyterLab's start, a kernel, torch's import, on a busy 2-core CPU
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no Chromium or chromedriver: apt-get install -y chromium chromium-driver", allow_module_level=True)
if selenium is None:
    pytest.skip("selenium is not installed (it is in requirements.txt: bash setup.sh)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# JupyterLab's user settings for the run: no autosave, no news pop-up, every cell in the page (no windowing).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
IMPORT_CELL = "from helpers.planner import planner  # added by tests/test_browser.py: the planner's one import"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _course_copy(base: Path) -> tuple[Path, int]:
    """A temporary course with the student notebook (plus the import cell), helpers/ linked to the real one;
    returns its root and the index, among code cells, of the cell that calls planner()."""
    course = base / "course"
    (course / "notebooks").mkdir(parents=True)
    (course / "helpers").symlink_to(ROOT / "helpers")  # the set-up cell finds the course root by helpers/
    (course / "requirements.txt").symlink_to(ROOT / "requirements.txt")
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4)
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    nb.cells.insert(code[0] + 1, nbformat.v4.new_code_cell(IMPORT_CELL))
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    calls = [k for k, cell in enumerate(code) if re.search(r"^planner\(", cell.source, re.M)]
    assert calls, f"notebooks/{NOTEBOOK}: no cell calls planner()"
    nbformat.write(nb, course / "notebooks" / NOTEBOOK)
    return course, calls[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free port, serving a temporary course; yields (base URL, token, course root, cell)."""
    base = tmp_path_factory.mktemp("browser")
    course, cell = _course_copy(base)
    settings = base / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JUPYTER_TOKEN")}
    env.update(JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_RUNTIME_DIR=str(base / "runtime"))
    log = open(base / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
        cwd=course, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STEP
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited ({server.returncode}):\n{(base / 'jupyterlab.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in {STEP} s:\n{(base / 'jupyterlab.log').read_text()}")
            time.sleep(0.5)
        yield url, token, course, cell
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", f"--window-size={WIDTH},{HEIGHT}", "--no-sandbox",
                     "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    except WebDriverException as err:
        pytest.skip(f"Chromium would not start under chromedriver: {err.msg}")
    driver.set_window_size(WIDTH, HEIGHT)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("COURSE_BROWSER_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The notebook as the learner sees it; every wait is explicit, and a timeout saves a screenshot."""

    def __init__(self, driver, shots: Path):
        self.driver, self.shots = driver, shots

    def wait(self, what: str, condition, timeout: float = STEP):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(lambda _d: condition())
        except TimeoutException:
            self.driver.save_screenshot(str(self.shots / "failure.png"))
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (screenshot: {self.shots}/failure.png)")

    def code_cells(self):
        return self.driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook .jp-CodeCell")

    def run(self, k: int):
        """Select code cell ``k`` (a click on its prompt: command mode) and press Shift+Enter; wait until it ran."""
        cell = self.code_cells()[k]
        prompt = cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-prompt")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        prompt.click()
        self.wait(f"code cell {k} to be selected", lambda: "jp-mod-selected" in cell.get_attribute("class"), 30)
        ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        self.wait(f"code cell {k} to run", lambda: re.fullmatch(r"\[\d+\]:", prompt.text.strip()))
        errors = cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type*='error'], "
                                                     ".jp-RenderedText[data-mime-type*='error']")
        text = "\n".join(e.text for e in errors)
        assert not errors and "Traceback" not in cell.text, f"code cell {k} failed:\n{text or cell.text}"
        return cell


def _geometry(driver, root):
    """Sizes the assertions need, read in the page: overflow of the output area and the widget, every
    description's full and shown width, every control's and the chart's box."""
    return driver.execute_script("""
        const root = arguments[0], area = root.closest('.jp-OutputArea');
        const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right,
                                                                        width: r.width}; };
        const labels = [...root.querySelectorAll('.widget-label, .widget-label-basic span')]
            .filter(e => e.textContent.trim() && e.offsetParent !== null)
            .map(e => ({text: e.textContent.trim(), scroll: e.scrollWidth, client: e.clientWidth}));
        const controls = [...root.querySelectorAll('.widget-dropdown, .widget-text, .widget-checkbox')]
            .map(e => ({text: e.textContent.trim(), ...box(e)}));
        const img = root.querySelector('img');
        return {area: {scroll: area.scrollWidth, client: area.clientWidth, ...box(area)},
                widget: {scroll: root.scrollWidth, client: root.clientWidth, ...box(root)},
                labels, controls, image: {...box(img), natural: img.naturalWidth, src: img.src},
                window: window.innerWidth};
    """, root)


def _state(root):
    """(verdict text, chart source) of the widget."""
    verdict = root.find_element(By.CSS_SELECTOR, ".widget-html-content").text
    return verdict, root.find_element(By.TAG_NAME, "img").get_attribute("src")


def _check_layout(geometry):
    area, widget = geometry["area"], geometry["widget"]
    assert area["scroll"] <= area["client"], f"the output area scrolls sideways: {area}"
    assert widget["scroll"] <= widget["client"], f"the planner is wider than its box: {widget}"
    cut = [label for label in geometry["labels"] if label["scroll"] > label["client"]]
    assert not cut, f"descriptions cut short: {cut}"
    assert len(geometry["labels"]) >= 14, f"not every control has a visible description: {geometry['labels']}"
    outside = [c for c in geometry["controls"] if c["right"] > area["right"] + 0.5 or c["left"] < area["left"] - 0.5]
    assert not outside, f"controls outside the output area: {outside}"
    image = geometry["image"]
    assert image["natural"] > 0 and image["width"] >= 400, f"the chart is missing or squeezed: {image}"
    assert image["right"] <= area["right"] + 0.5, f"the chart runs past the output area: {image}, {area}"


def test_planner_in_jupyterlab(lab, browser, shots):
    url, token, course, planner_cell = lab
    page = Page(browser, shots)
    browser.get(f"{url}/lab/tree/notebooks/{NOTEBOOK}?reset&token={token}")
    page.wait("the notebook to open", lambda: len(page.code_cells()) > planner_cell)
    page.wait("the kernel to be idle", lambda: browser.find_elements(
        By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']"))
    assert browser.execute_script("return window.innerWidth") == WIDTH

    # The set-up cell, the import, then the planner: selected and run with Shift+Enter, as a learner would.
    setup = page.run(0)
    assert "CPU" in setup.text or "CUDA" in setup.text, setup.text  # it says which device the lessons use
    page.run(1)
    cell = page.run(planner_cell)
    root = page.wait("the planner widget", lambda: cell.find_elements(By.CSS_SELECTOR, ".course-planner"))[0]
    page.wait("the planner's plan and chart",
              lambda: "Your recipe" in _state(root)[0] and root.find_element(By.TAG_NAME, "img")
              .get_attribute("naturalWidth") not in (None, "0"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", root)
    before, chart_before = _state(root)
    m = re.search(r"on (\S+) \(.*?\): batch (\d+) ", before)
    assert m, before
    gpu_before, batch_before = m.groups()
    browser.save_screenshot(str(shots / "planner_before.png"))
    root.screenshot(str(shots / "planner_widget_before.png"))
    _check_layout(_geometry(browser, root))

    # Two controls: another GPU, a bigger batch.
    gpu_select = root.find_element(By.XPATH, ".//label[normalize-space()='GPU']/following-sibling::select")
    choices = [o.text for o in Select(gpu_select).options]
    gpu_after = "A100 80GB" if gpu_before != "A100 80GB" else choices[0]
    Select(gpu_select).select_by_visible_text(gpu_after)
    page.wait(f"the plan for {gpu_after}", lambda: f"on {gpu_after} (" in _state(root)[0], 60)
    batch_after = str(int(batch_before) * 4)
    batch = root.find_element(By.XPATH, ".//label[normalize-space()='batch']/following-sibling::input")
    batch.send_keys(Keys.CONTROL, "a")
    batch.send_keys(batch_after, Keys.ENTER)
    page.wait(f"the plan for batch {batch_after}", lambda: f": batch {batch_after} " in _state(root)[0], 60)
    page.wait("the new chart", lambda: _state(root)[1] != chart_before, 60)
    after, chart_after = _state(root)
    assert f"on {gpu_before} (" in before and f"batch {batch_before} " in before
    assert f"on {gpu_after} (" in after and f"on {gpu_before} (" not in after, after
    assert f"batch {batch_after} " in after and f"batch {batch_before} " not in after, after
    assert chart_after != chart_before
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", root)
    browser.save_screenshot(str(shots / "planner_after.png"))
    root.screenshot(str(shots / "planner_widget_after.png"))
    narrow = _geometry(browser, root)
    _check_layout(narrow)

    # The whole 1,000 pixels for the notebook: the file browser closed (a click on its tab in the left bar).
    browser.find_element(By.CSS_SELECTOR, ".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
    page.wait("the notebook to widen", lambda: _geometry(browser, root)["area"]["width"]
              > narrow["area"]["width"] + 150, 30)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", root)
    browser.save_screenshot(str(shots / "planner_after_wide.png"))
    _check_layout(_geometry(browser, root))
