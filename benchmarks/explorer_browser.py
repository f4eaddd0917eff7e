"""Drive explorer.html (explorer.py) in a real browser: Debian's Chromium, headless, through
playwright.

    python benchmarks/explorer_browser.py runs/fashion-h400-z2-s0/explorer.html explorer.png

saves a screenshot of the page (save_screenshot); tests/test_explorer.py uses the rest. Neither the
browser nor playwright is a dependency of the project: .ci/run installs both (apt-get install
chromium; python -m pip install playwright) so that CI runs the browser test, which skips where
they are missing (browser_missing says why). playwright drives the installed Chromium by its path:
`playwright install`, which downloads a browser of its own, is never needed. Every request the
browser makes is recorded, so that a test can hold the page to file:// alone.
"""
import contextlib
import importlib.util
import os
import pathlib
import sys
import tempfile

import numpy as np

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1040, "height": 680}


def browser_missing():
    """Why the browser cannot be driven here, in one line; None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (python -m pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@contextlib.contextmanager
def chromium():
    """Headless Chromium with a fresh profile: yields (context, requests), a playwright
    BrowserContext and the list of the URLs of every request made in it, as they are made."""
    from playwright.sync_api import sync_playwright
    requests = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport=VIEWPORT)
        context.on("request", lambda request: requests.append(request.url))
        try:
            yield context, requests
        finally:
            context.close()


def load(context, html_path):
    """The page in a new tab, its scripts run: (page, errors), errors the page's uncaught errors
    (none, when all is well), kept as they happen."""
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(pathlib.Path(html_path).resolve().as_uri())
    page.wait_for_function("typeof window.vaeDecode === 'function'")
    return page, errors


def decode(page, points):
    """window.vaeDecode at each (z0, z1) of points: the page's means, (n, 784) float64."""
    script = "points => points.map(z => window.vaeDecode(z[0], z[1]))"
    means = page.evaluate(script, [[float(z0), float(z1)] for z0, z1 in points])
    return np.array(means)


def codes(page):
    """The codes the page shows, (n, 2)."""
    return np.array(page.evaluate("window.vaeCodes()")).reshape(-1, 2)


def on_page(page, z):
    """Where on the page (CSS pixels) the plane shows the point z = (z0, z1)."""
    box = page.locator("#plane").bounding_box()
    x, y = page.evaluate("z => window.vaePixel(z[0], z[1])", [float(z[0]), float(z[1])])
    return box["x"] + x, box["y"] + y


def move_pointer(page, z):
    """The pointer to the point z of the plane; returns the point the page decoded there (the
    pointer sits on a pixel, so it is z to within a pixel's width)."""
    x, y = on_page(page, z)
    page.mouse.move(x, y)
    return np.array(page.evaluate("window.vaePointer()"))


def click(page, z):
    x, y = on_page(page, z)
    page.mouse.click(x, y)


def shown_image(page, canvas_id="decoded"):
    """The 28 x 28 image a square canvas shows, read back from its pixels at the centres of its 784
    cells, as values in [0, 1] (white 0, black 1, as the page draws them): (784,)."""
    script = """id => {
        const canvas = document.getElementById(id);
        const side = canvas.width;
        const cell = side / 28;
        const data = canvas.getContext("2d").getImageData(0, 0, side, side).data;
        const values = [];
        for (let r = 0; r < 28; r++) {
            for (let c = 0; c < 28; c++) {
                const x = Math.floor((c + 0.5) * cell);
                const y = Math.floor((r + 0.5) * cell);
                values.push(1 - data[4 * (y * side + x)] / 255);    // red = green = blue
            }
        }
        return values;
    }"""
    return np.array(page.evaluate(script, canvas_id))


def save_screenshot(html_path, png_path):
    """A screenshot (PNG) of the page as a reader leaves it: test image 0's code clicked (its image
    beside its decoding), the straight path from it to the farthest of the first 100 codes, and the
    pointer at the path's middle. Raises RuntimeError where the browser is missing or the page
    fails."""
    missing = browser_missing()
    if missing:
        raise RuntimeError(f"cannot take the screenshot: {missing}")
    with chromium() as (context, requests):
        page, errors = load(context, html_path)
        shown = codes(page)
        start = shown[0]
        distances = np.linalg.norm(shown[:100] - start, axis=1)
        end = shown[:100][np.argmax(distances)]
        click(page, start)
        page.check("#path-mode")
        click(page, start)
        click(page, end)
        move_pointer(page, (start + end) / 2)
        tmp = f"{png_path}.tmp-{os.getpid()}"
        page.screenshot(path=tmp, type="png", full_page=True)
        os.replace(tmp, png_path)
    if errors:
        raise RuntimeError(f"the page failed: {errors[0]}")
    beyond = [url for url in requests if not url.startswith("file://")]
    if beyond:
        raise RuntimeError(f"the page requested {beyond[0]}")
    return png_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/explorer_browser.py EXPLORER_HTML PNG")
    print("wrote", save_screenshot(sys.argv[1], sys.argv[2]))
