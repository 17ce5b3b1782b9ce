"""The chat page at `/`, in a real headless browser: Debian's chromium driven by Selenium through the system
chromedriver (nothing is downloaded). A message typed into the page streams its reply in, the same text the API
gives for the same settings, with tokens/s shown; the conversation survives a reload (localStorage). The
screenshot goes to the test's tmp_path (its path is printed). Skips, saying why, without chromium, chromedriver or
selenium (CI installs them: .ci/run, the `browser` extra)."""

from __future__ import annotations

import re
import shutil

import httpx
import pytest
import torch

from gptforge.checkpoint import write_checkpoint
from gptforge.config import ModelConfig, RunConfig
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from serverproc import KEY, Server

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="the browser test needs selenium (pip install -e .[browser])")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                                                   "(apt-get install chromium chromium-driver)")
TEXT = ["the quick brown fox jumps over the lazy dog. " * 40, "to be or not to be, that is the question. " * 40]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = Tokenizer.train(TEXT, vocab_size=320)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=512)
    torch.manual_seed(0)
    ckpt = write_checkpoint(root / "tiny", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    s = Server(ckpt, root / "server.log", "--model-name", "tiny", "--api-key", KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,720",
                "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def set_field(driver, field: str, value: str) -> None:
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", el)


def test_the_page_is_one_self_contained_file(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert not re.search(r"https?://", r.text) and not re.search(r"<(script|link|img)[^>]+(src|href)=", r.text)


def test_a_message_streams_its_reply_into_the_page(server, browser, tmp_path):
    d = browser
    d.get(server.url + "/")
    d.execute_script("localStorage.clear()")
    d.get(server.url + "/")
    set_field(d, "key", KEY)  # the server wants a key: the page's field sends it
    WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value=tiny]"))
    set_field(d, "temperature", "0")
    set_field(d, "max_tokens", "24")
    d.find_element(By.ID, "input").send_keys("to be or not")
    d.find_element(By.ID, "send").click()
    reply = WebDriverWait(d, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg:last-child[data-done]"))
    assert "error" not in reply.get_attribute("class"), reply.text
    text = reply.find_element(By.CLASS_NAME, "content").text
    stats = reply.find_element(By.CLASS_NAME, "stats").text
    assert int(reply.get_attribute("data-chunks")) >= 2  # it arrived in pieces, each shown as it came
    assert re.search(r"^\d+ tokens, [\d.]+ tokens/s, first token \d+ ms", stats), stats
    assert "temperature 0, top_p 1, max_tokens 24" in stats
    # the page shows what the API answers for the same request (greedy)
    api = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "to be or not"}],
                                                  temperature=0, top_p=1, max_tokens=24)
    assert text == api.choices[0].message.content.strip()  # (the browser trims the bubble's trailing space)
    shot = tmp_path / "chat_page.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 5000
    print(f"\nscreenshot: {shot}")
    # the conversation and the settings live in the browser: a reload brings them back
    d.refresh()
    WebDriverWait(d, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
    assert d.find_elements(By.CSS_SELECTOR, ".msg .content")[1].text == text
    assert d.find_element(By.ID, "temperature").get_attribute("value") == "0"


def test_a_wrong_key_shows_the_servers_error(server, browser):
    d = browser
    d.get(server.url + "/")
    set_field(d, "key", "wrong")
    d.find_element(By.ID, "input").send_keys("hi")
    d.find_element(By.ID, "send").click()
    err = WebDriverWait(d, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.error:last-child"))
    assert "401 invalid_api_key" in err.text
