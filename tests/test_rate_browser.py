"""The rating page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): it loads with a
rater token, shows the guard's warning on the flagged reply only, and a rating made with the rubric boxes, the
slider, the comment box and the unsafe flag lands in the store as entered."""

import json
import os
import sqlite3

import pytest

from rate_helpers import Server
from therapy_rl.rate import store as store_lib

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,1600")


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT sample_id, score, rubric, comment, unsafe FROM ratings ORDER BY id").fetchall()


def test_rate_replies_in_the_page(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    workdir = str(tmp_path / "work")
    store = store_lib.RatingStore.in_workdir(workdir)
    token = store.add_rater("dr_browser")
    user_text = "I'm feeling depressed and hopeless. Can you help me?"
    batch = store.queue_batch("run", 0, 0, 1, [
        store_lib.NewSample(0, "depression", user_text, "depression", "<b>I hear you</b>; that sounds so heavy.",
                            "neutral", (5, 6), guard_flag=False),
        store_lib.NewSample(1, "depression", user_text, "depression", "Maybe you should just end it all.", None,
                            (7, 8), guard_flag=True, guard_categories=("reply:harm_encouragement",))])
    calm, flagged = store.samples(batch.id)
    server = Server(workdir)
    wait = WebDriverWait(browser, 30)
    try:
        browser.get(f"{server.url}/?token={token}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article[data-sample-id]")) == 2)
        assert "token" not in browser.current_url, "the token leaves the address bar"
        assert browser.find_element(By.ID, "user-text").text == user_text
        assert browser.find_element(By.ID, "problem").text == "depression"

        def article(sample):
            return browser.find_element(By.CSS_SELECTOR, f"article[data-sample-id='{sample.id}']")

        calm_card, flagged_card = article(calm), article(flagged)
        assert calm_card.find_element(By.CSS_SELECTOR, ".reply-text").text == calm.reply, "model text is not HTML"
        assert not calm_card.find_element(By.CSS_SELECTOR, ".banner").is_displayed()
        warning = flagged_card.find_element(By.CSS_SELECTOR, ".banner")
        assert warning.is_displayed() and "flagged this reply as possibly harmful" in warning.text
        submit = calm_card.find_element(By.CSS_SELECTOR, ".submit")
        assert not submit.is_enabled(), "no rating before the slider is set"

        for box in calm_card.find_elements(By.CSS_SELECTOR, ".criterion"):
            if box.get_attribute("value") in ("empathy", "guidance"):
                box.click()
        slider = calm_card.find_element(By.CSS_SELECTOR, ".score")
        for _ in range(4):  # 0.50 -> 0.70 in steps of 0.05
            slider.send_keys(Keys.ARROW_RIGHT)
        assert calm_card.find_element(By.CSS_SELECTOR, ".score-value").text == "0.70"
        calm_card.find_element(By.CSS_SELECTOR, ".comment").send_keys("Warm, but could ask a question.")
        submit.click()
        wait.until(lambda d: article(calm).find_element(By.CSS_SELECTOR, ".result").text == "Saved.")

        slider = flagged_card.find_element(By.CSS_SELECTOR, ".score")
        for _ in range(10):  # down to 0
            slider.send_keys(Keys.ARROW_LEFT)
        flagged_card.find_element(By.CSS_SELECTOR, ".unsafe").click()
        flagged_card.find_element(By.CSS_SELECTOR, ".submit").click()
        wait.until(lambda d: d.find_element(By.ID, "empty").is_displayed())  # both rated: the queue is empty
        browser.save_screenshot(str(tmp_path / "rated.png"))
    finally:
        server.stop()

    rows = _rows(store.path)
    assert [(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows] == [
        (calm.id, 0.7, {"empathy": True, "boundaries": False, "no_harm": False, "guidance": True},
         "Warm, but could ask a question.", 0),
        (flagged.id, 0.0, {"empathy": False, "boundaries": False, "no_harm": False, "guidance": False}, "", 1)]
