"""The chat page (`GET /`) in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver.

The page loads and finds the model, sends a message, and shows the memorised reply (tests/serving.py) streamed
into it, its reasoning in a collapsible panel; the conversation is kept in the page; with thinking off the panel
stays hidden; Stop aborts a request (here one waiting for the server's only slot, so the abort is certain to
come before the reply) and the server forgets it. A screenshot of the conversation is saved in
runs/screenshots/serve_chat.png.

Chromium and chromedriver come from Debian's packages `chromium` and `chromium-driver`: when they are missing
the test installs them with apt-get (it needs root and the package archive), and skips, saying why, when it
cannot. Chromium starts with the flags this sandbox needs (no sandbox as root, no GPU, no background network).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import serving as sc
from serving import Running

from nemotron3.serve import ServeConfig

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parents[2] / "runs" / "screenshots" / "serve_chat.png"


def _install_chromium() -> str | None:
    """Install Debian's chromium and chromium-driver if missing; None when they are there, else why not."""
    if Path(CHROMIUM).exists() and Path(DRIVER).exists():
        return None
    if shutil.which("apt-get") is None:
        return "chromium / chromedriver are missing and there is no apt-get to install them"
    if os.geteuid() != 0:
        return ("chromium / chromedriver are missing; installing them needs root "
                "(apt-get install chromium chromium-driver)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None if Path(CHROMIUM).exists() and Path(DRIVER).exists() else "apt-get ran but chromium is not there"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    why = _install_chromium()
    if why is not None:
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,800", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = sc.build(tmp_path_factory.mktemp("served") / "tiny-chat")
    s = Running(ServeConfig(model=folder, max_batch=1, max_seq_len=2048))
    yield s
    s.stop()


def _wait(driver, script: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {script}")


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _set(driver, element_id: str, value: str) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'));", element_id, value)


def test_the_page_chats_with_streamed_answers_and_a_reasoning_panel(browser, server):
    from selenium.webdriver.common.by import By

    page = server.text("/")
    assert "http://" not in page.replace(server.url, "") and "https://" not in page and "<script src" not in page
    browser.get(server.url + "/")
    assert _wait(browser, "document.getElementById('model').textContent.startsWith('tiny-chat')")
    _set(browser, "temperature", "0")
    # count the answer's updates as they happen: a streamed answer arrives in several pieces
    browser.execute_script("""
        window.answerUpdates = 0;
        new MutationObserver((records) => {
          for (const r of records) if (r.target.closest && r.target.closest('.answer')) window.answerUpdates++;
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    _send(browser, "Hello there")
    assert _wait(browser, "document.querySelector('.msg.assistant')?.dataset.finish") == "stop"
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    assert bubble.find_element(By.CSS_SELECTOR, ".answer").text == sc.GREETING_REPLY
    panel = bubble.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert panel.get_attribute("hidden") is None and panel.get_attribute("open") is None  # folded once answered
    panel.find_element(By.TAG_NAME, "summary").click()  # unfold it
    assert panel.get_attribute("open") is not None
    assert panel.find_element(By.CSS_SELECTOR, ".thought").text == sc.GREETING_REASONING
    assert browser.execute_script("return window.answerUpdates") > 1
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
    assert browser.execute_script("return conversation") == [
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": sc.GREETING_REPLY}]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

    # a new chat with thinking off: the reasoning-off reply, no panel
    browser.find_element(By.ID, "reset").click()
    assert browser.execute_script("return conversation.length") == 0
    browser.find_element(By.ID, "thinking").click()
    _send(browser, "Hello there")
    assert _wait(browser, "document.querySelector('.msg.assistant')?.dataset.finish") == "stop"
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    assert bubble.find_element(By.CSS_SELECTOR, ".answer").text == sc.GREETING_OFF_REPLY
    assert bubble.find_element(By.CSS_SELECTOR, "details.reasoning").get_attribute("hidden") is not None


def test_stop_aborts_the_request(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert _wait(browser, "document.getElementById('model').textContent.startsWith('tiny-chat')")
    blocker = server.stream("/v1/completions", {"model": "tiny-chat", "prompt": [1, 2, 3], "max_tokens": 1900})
    try:
        _send(browser, "Hello there")
        assert _wait(browser, "!document.getElementById('stop').disabled")
        deadline = time.time() + 10
        while server.metric("nemotron3_requests_waiting") != 1:  # the page's request waits for the only slot
            assert time.time() < deadline
            time.sleep(0.05)
        browser.find_element(By.ID, "stop").click()
        assert _wait(browser, "document.querySelector('.msg.assistant')?.dataset.finish") == "stopped"
        assert browser.find_element(By.ID, "send").is_enabled()
        assert browser.execute_script("return conversation.length") == 0  # nothing kept from the stopped turn
        deadline = time.time() + 10
        while server.metric("nemotron3_requests_waiting") != 0:  # the server dropped it
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        blocker.close()
