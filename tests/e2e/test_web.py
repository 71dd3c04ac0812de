"""The web page in a real browser: Debian's headless Chromium, driven by Selenium through
chromium-driver, against a whole cluster (Piper workers) through nginx.

One cluster and one browser for the module. The cluster requires an API key, so the page's key
field is exercised on the way (the key is typed once and remembered). Audio is checked by what
the page played and decoded, against what the API returns for the same text. Set WEB_SCREENSHOT
to a path to keep the screenshot taken after a synthesis (README.md's comes from there).
"""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from redis.asyncio import Redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from cluster import launcher
from cluster.settings import ClusterSettings
from gateway.voices import RegisteredVoice, VoiceStore
from tests.e2e.conftest import cluster_on_free_ports

SPOKEN = "The page plays speech as it streams. The second sentence arrives a little later."
CACHED = "Spoken twice, made once."
TESTIDS = ("text", "voice", "format", "speed", "speak", "audio", "status", "error")
SYNTHESIS_TIMEOUT_S = 90
KEY = "web-page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[ClusterSettings]:
    # A low rate, so that the last test reaches the limit whatever the machine's speed; the
    # burst is far above what a page load and a test's own requests take.
    settings = cluster_on_free_ports(
        run_dir, gateways=1, workers=2, rate_per_addr="20r/s", burst_per_addr=40, ready_timeout=240
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GATEWAY_API_KEYS", KEY)  # read by the gateways the launcher starts
            launcher.up(settings)
        yield settings
    finally:
        records = launcher.load_records(settings)
        launcher.down(settings)
        assert not [record.name for record in records.values() if record.alive()]


@pytest.fixture(scope="module")
def downloads(run_dir: Path) -> Path:
    path = run_dir / "downloads"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    # Both paths given: Selenium Manager never runs, so nothing looks for or fetches a browser.
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,1700",
        "--mute-audio",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_ready(browser: webdriver.Chrome) -> None:
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
    )


def _open(browser: webdriver.Chrome, url: str) -> None:
    """Load the page; its key was remembered by the first test (or is entered here)."""
    browser.get(url)
    _wait_ready(browser)
    if not _testid(browser, "api-key").get_attribute("value"):
        _enter_key(browser, KEY)
    assert _testid(browser, "status").text == "Ready.", _testid(browser, "error").text


def _enter_key(browser: webdriver.Chrome, key: str) -> None:
    field = _testid(browser, "api-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)
    WebDriverWait(browser, 30).until(
        lambda _: (
            _testid(browser, "status").text == "Ready." or _testid(browser, "error").is_displayed()
        )
    )


def _testid(browser: webdriver.Chrome, name: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def _console_errors(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _type_text(browser: webdriver.Chrome, text: str) -> WebElement:
    box = _testid(browser, "text")
    box.clear()
    box.send_keys(text)
    return box


def _wait_for_result(browser: webdriver.Chrome) -> dict[str, str]:
    audio = _testid(browser, "audio")
    WebDriverWait(browser, SYNTHESIS_TIMEOUT_S).until(
        lambda _: audio.get_attribute("data-state") in {"done", "error", "stopped"}
    )
    data: dict[str, str] = browser.execute_script("return {...arguments[0].dataset}", audio)
    assert data["state"] == "done", (data, _testid(browser, "error").text)
    return data


def _api_speech(url: str, text: str, voice: str, response_format: str) -> httpx.Response:
    body = {
        "model": "tts-1",
        "input": text,
        "voice": voice,
        "response_format": response_format,
        "speed": 1.0,
    }
    return httpx.post(f"{url}/v1/audio/speech", json=body, headers=AUTH, timeout=120)


def _default_voice(url: str) -> str:
    voices = httpx.get(f"{url}/v1/voices", headers=AUTH, timeout=30).json()["data"]
    return next(voice["id"] for voice in voices if voice.get("default"))


def _wav_seconds(data: bytes) -> tuple[float, int, float]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return len(audio) / rate, int(rate), float(np.sqrt(np.mean(np.square(audio))))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _raw_get(
    cluster: ClusterSettings, path: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A GET with the path sent exactly as written (httpx would normalise dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.public_port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_nginx_serves_the_page_and_nothing_internal(cluster: ClusterSettings) -> None:
    for path in ("/", "/web", "/web/assets/app.js", "/web/assets/app.css"):
        status, headers, body = _raw_get(cluster, path, {"X-Request-ID": "web-page-1"})
        assert status == 200, path
        assert headers.get_all("X-Request-ID") == ["web-page-1"], path
        assert "default-src 'none'" in headers["Content-Security-Policy"], path
        assert body
    for path in (
        "/metrics",
        "/web/metrics",
        "/web/assets/../../metrics",
        "/web/assets/%2e%2e/%2e%2e/metrics",
        "/web/assets/..%2f..%2fmetrics",
        "/web/assets/routes_web.py",
        "/web/assets/missing.js",
        "/v1/info",
    ):
        status, headers, body = _raw_get(cluster, path)
        assert status in (400, 404), (path, status)
        assert headers["Content-Type"].startswith("application/json"), path
        assert b'"error"' in body, path
    # The page is public; the API behind it still needs the key.
    status, _, body = _raw_get(cluster, "/v1/voices")
    assert status == 401
    assert b'"unauthorized"' in body


def test_page_loads_clean_with_voices_from_the_api(
    cluster: ClusterSettings, browser: webdriver.Chrome
) -> None:
    url = cluster.public_url
    listed = httpx.get(f"{url}/v1/voices", headers=AUTH, timeout=30).json()
    browser.get(f"{url}/")
    _wait_ready(browser)
    # Keys are required: the page asks for one before it calls the API at all.
    assert _testid(browser, "api-key").is_displayed()
    assert "requires an API key" in _testid(browser, "status").text
    assert _console_errors(browser) == []
    _enter_key(browser, "not-the-key")
    assert _testid(browser, "error-code").text == "unauthorized"
    browser.get_log("browser")  # the refused requests' own console lines
    browser.find_element(By.ID, "remember-key").click()
    _enter_key(browser, KEY)
    assert _testid(browser, "status").text == "Ready.", _testid(browser, "error").text
    assert _console_errors(browser) == []
    assert KEY not in browser.current_url
    assert browser.execute_script("return localStorage.getItem('tts-api-key')") == KEY
    for name in TESTIDS:
        _testid(browser, name)
    select = Select(_testid(browser, "voice"))
    expected = [voice["id"] for voice in listed["data"]] + list(listed["openai_aliases"])
    assert [option.get_attribute("value") for option in select.options] == expected
    assert select.first_selected_option.get_attribute("value") == _default_voice(url)
    assert _testid(browser, "status").text == "Ready."
    assert not _testid(browser, "error").is_displayed()
    assert _testid(browser, "text-count").text.endswith("/ 4096 characters")
    # Piper cannot clone: the page says so and keeps the registration form disabled.
    assert "cannot clone" in _testid(browser, "clone-note").text
    assert not _testid(browser, "register").is_enabled()
    # Instructions are hidden for an engine that takes none.
    assert not _testid(browser, "instructions").is_displayed()
    unlabelled = browser.execute_script(
        """return [...document.querySelectorAll("input, select, textarea, button, audio")]
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                && !el.getAttribute("aria-labelledby")
                && !(el.tagName === "BUTTON" && el.textContent.trim())
                || el.tabIndex < 0)
            .map((el) => el.id || el.outerHTML.slice(0, 60));"""
    )
    assert unlabelled == []
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert {resource.rsplit("/", 1)[0] for resource in resources} >= {f"{url}/web/assets"}
    assert [r for r in resources if not r.startswith(f"{url}/")] == []
    assert [r for r in resources if KEY in r] == []
    assert len(resources) >= 5  # script, style sheet, icon, models, voices


def test_speak_plays_the_stream_and_download_keeps_it(
    cluster: ClusterSettings, browser: webdriver.Chrome, downloads: Path, tmp_path: Path
) -> None:
    url = cluster.public_url
    voice = _default_voice(url)
    reference = _api_speech(url, SPOKEN, voice, "wav")
    assert reference.status_code == 200
    seconds, rate, rms = _wav_seconds(reference.content)
    assert seconds > 2.0
    assert rms > 0.01
    _open(browser, f"{url}/web")
    Select(_testid(browser, "format")).select_by_value("wav")
    _type_text(browser, SPOKEN).send_keys(Keys.CONTROL, Keys.ENTER)  # Speak, from the keyboard
    data = _wait_for_result(browser)
    assert data["cache"] == "MISS"
    assert _testid(browser, "cache").text == "MISS"
    played, received = float(data["playedS"]), float(data["durationS"])
    assert abs(played - seconds) <= 0.2 * seconds, (played, seconds)
    assert abs(received - seconds) <= 0.2 * seconds, (received, seconds)
    decoded = browser.execute_script(
        "const a = arguments[0]; return a.readyState >= 1 ? a.duration : null;",
        _testid(browser, "audio"),
    )
    assert decoded is not None
    assert abs(decoded - seconds) <= 0.2 * seconds, (decoded, seconds)
    # Time to first audio: positive, before the whole response had arrived, shown as measured.
    first, complete = float(data["firstAudioMs"]), float(data["completeMs"])
    assert 0 < first < complete < SYNTHESIS_TIMEOUT_S * 1000, (first, complete)
    assert _testid(browser, "ttfa").text == f"{data['firstAudioMs']} ms"
    assert "MISS" in _testid(browser, "status").text
    assert _console_errors(browser) == []

    shot = Path(os.environ.get("WEB_SCREENSHOT") or tmp_path / "web.png")
    assert browser.save_screenshot(str(shot))
    width, height = _png_size(shot)
    assert width >= 800
    assert height >= 800

    _testid(browser, "download").click()
    target = downloads / "speech.wav"
    WebDriverWait(browser, 60, poll_frequency=0.1).until(lambda _: target.exists())
    # The same request as the reference, answered from the cache: the same samples, in a
    # complete file (true sizes) where the streamed miss had a streaming header.
    saved = target.read_bytes()
    assert saved[44:] == reference.content[44:]
    assert int.from_bytes(saved[40:44], "little") == len(saved) - 44
    assert _wav_seconds(target.read_bytes())[1] == rate
    assert "X-Cache HIT" in _testid(browser, "status").text


def test_a_second_speak_comes_from_the_cache(
    cluster: ClusterSettings, browser: webdriver.Chrome
) -> None:
    _open(browser, f"{cluster.public_url}/")
    _type_text(browser, CACHED)
    _testid(browser, "speak").click()
    first = _wait_for_result(browser)
    _testid(browser, "speak").click()
    second = _wait_for_result(browser)
    assert (first["cache"], second["cache"]) == ("MISS", "HIT")
    assert _testid(browser, "cache").text == "HIT"
    assert "X-Cache HIT" in _testid(browser, "status").text
    assert second["durationS"] == first["durationS"]
    assert float(second["playedS"]) > 0.5


def test_an_over_long_text_shows_the_api_error(
    cluster: ClusterSettings, browser: webdriver.Chrome
) -> None:
    text = "word " * 1000
    refused = _api_speech(cluster.public_url, text, "alloy", "pcm")
    assert refused.status_code == 422
    code = refused.json()["error"]["code"]
    _open(browser, f"{cluster.public_url}/")
    box = _testid(browser, "text")
    browser.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
        box,
        text,
    )
    assert "too long" in _testid(browser, "text-count").text
    _testid(browser, "speak").click()
    WebDriverWait(browser, 30).until(lambda _: _testid(browser, "error").is_displayed())
    assert _testid(browser, "error-code").text == code
    assert refused.json()["error"]["message"] in _testid(browser, "error").text
    assert _testid(browser, "audio").get_attribute("data-state") == "error"
    assert code in _testid(browser, "status").text
    assert _testid(browser, "speak").is_enabled()


def test_a_microphone_recording_is_a_prompt_the_gateway_accepts(
    cluster: ClusterSettings, browser: webdriver.Chrome
) -> None:
    """Chromium's fake microphone, encoded to WAV by the page: the gateway validates it as a
    prompt and then refuses it only because Piper cannot clone."""
    _open(browser, f"{cluster.public_url}/")
    result = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        (async () => {
          const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
          const recorder = new MediaRecorder(stream);
          const chunks = [];
          recorder.ondataavailable = (event) => chunks.push(event.data);
          const stopped = new Promise((resolve) => (recorder.onstop = resolve));
          recorder.start();
          await new Promise((resolve) => setTimeout(resolve, 3500));
          recorder.stop();
          await stopped;
          stream.getTracks().forEach((track) => track.stop());
          const wav = await toWav(new Blob(chunks, { type: recorder.mimeType }));
          const form = new FormData();
          form.append("prompt_audio", wav, "recording.wav");
          form.append("prompt_text", "A fake microphone.");
          const response = await fetch("/v1/voices", {
            method: "POST", body: form, headers: authHeaders() });
          const bytes = new Uint8Array(await wav.arrayBuffer());
          return { status: response.status, body: await response.json(),
                   head: String.fromCharCode(...bytes.slice(0, 4)), size: bytes.length };
        })().then(done, (error) => done({ error: String(error) }));"""
    )
    assert "error" not in result, result
    assert result["head"] == "RIFF"
    assert result["size"] > 3 * 24000 * 2
    assert result["status"] == 422, result
    assert result["body"]["error"]["code"] == "prompt_unsupported"


def _store_voice(cluster: ClusterSettings, voice_id: str) -> None:
    """A registered voice written where the gateways keep them: Piper cannot register one."""

    async def save() -> None:
        client = Redis.from_url(cluster.redis_url)
        try:
            await VoiceStore(client, 5.0).save(
                RegisteredVoice(
                    id=voice_id,
                    name="Stored for the page",
                    engine="piper",
                    model_version="test",
                    prompt_text="A stored voice.",
                    prompt_sha256="0" * 64,
                    created_at=time.time(),
                    features=b"\0" * 16,
                )
            )
        finally:
            await client.aclose()

    asyncio.run(save())


def test_a_registered_voice_is_listed_and_deleted_from_the_page(
    cluster: ClusterSettings, browser: webdriver.Chrome
) -> None:
    voice_id = "page_voice_1"
    _store_voice(cluster, voice_id)
    _open(browser, f"{cluster.public_url}/")
    rows = _testid(browser, "registered").find_elements(By.TAG_NAME, "tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in rows] == [voice_id]
    values = [o.get_attribute("value") for o in Select(_testid(browser, "voice")).options]
    assert voice_id in values
    button = browser.find_element(By.CSS_SELECTOR, f'button[aria-label="Delete voice {voice_id}"]')
    button.send_keys(Keys.ENTER)  # from the keyboard
    WebDriverWait(browser, 30).until(
        lambda _: not _testid(browser, "registered").find_elements(By.TAG_NAME, "tr")
    )
    assert _testid(browser, "status").text == f"Deleted voice {voice_id}."
    gone = httpx.get(f"{cluster.public_url}/v1/voices/{voice_id}", headers=AUTH, timeout=30)
    assert gone.status_code == 404
    assert voice_id not in [
        o.get_attribute("value") for o in Select(_testid(browser, "voice")).options
    ]


def test_the_page_is_rate_limited_like_the_api(cluster: ClusterSettings) -> None:
    """Last in the module: it spends the address's burst (the limit refills within seconds)."""
    statuses: list[int] = []
    codes: set[str] = set()
    with httpx.Client(base_url=cluster.public_url, timeout=30) as client:
        for _ in range(cluster.burst_per_addr + 160):
            response = client.get("/web/assets/favicon.svg")
            statuses.append(response.status_code)
            if response.status_code == 429:
                codes.add(response.json()["error"]["code"])
    assert set(statuses) == {200, 429}
    assert codes == {"rate_limited"}
