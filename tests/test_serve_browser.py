"""The chat page at `/`, in a real headless Chromium driven by Selenium: type a message, watch the
reply stream in, and keep a screenshot in the test's tmp directory. Skips without a browser
(`apt-get install chromium chromium-driver`) or without selenium."""
import shutil

import pytest
import torch

import llmstack
from llmstack.model import ModelConfig, Transformer
from llmstack.tokenizer import Tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from llmstack.serve.server import build_app  # noqa: E402
from test_serve_http import TEXT, running  # noqa: E402

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if BROWSER is None or DRIVER is None:
        pytest.skip("no Chromium and chromedriver found (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply(browser, tmp_path):
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    model.init_weights()
    model.eval()
    want = llmstack.chat(model, tok, [{"role": "user", "content": "def add"}], 40, temperature=0)
    with running(build_app(model, tok, model_name="tiny")) as url:
        browser.get(url + "/")
        assert browser.find_element(By.ID, "model").text == "tiny"
        for field, value in (("temperature", "0"), ("max-tokens", "40")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "input").send_keys("def add")
        browser.find_element(By.ID, "send").click()

        def finished(driver):
            replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")
            if replies:
                return replies[-1].get_attribute("data-done") == "1" and replies[-1]
            return False

        reply = WebDriverWait(browser, 60, poll_frequency=0.02).until(finished)
        browser.save_screenshot(str(tmp_path / "chat.png"))
        assert "error" not in reply.get_attribute("class"), reply.text
        assert reply.get_property("textContent") == want
        assert "40 tokens in" in browser.find_element(By.ID, "stats").text  # the usage the stream ended with
        assert "tokens/s" in browser.find_element(By.ID, "stats").text
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text.endswith("def add")
        # a second turn carries the conversation: the server receives both turns
        browser.find_element(By.ID, "input").send_keys("more")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60, poll_frequency=0.05).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == 2)
        browser.save_screenshot(str(tmp_path / "chat-2.png"))
    assert (tmp_path / "chat.png").stat().st_size > 1000
    print(f"screenshot: {tmp_path / 'chat.png'}")
