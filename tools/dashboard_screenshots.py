"""Take the dashboard screenshots in docs/images/ from a live coordinator.

Run from the repository root (needs the dashboard extra, Playwright and Debian's chromium):

    .venv/bin/python tools/dashboard_screenshots.py [--out docs/images] [--chromium PATH]

A mixed workload runs (Fibonacci in worker processes, image resizes on threads, quote fetches on
the I/O lane, some failing) with two hold rules installed: the Guard House's anomaly rule on the
resizes and a predicate on the quotes. Once the resizes have history, an 80 MB resize (40x their
usual 2 MB) and a quote of an unknown symbol are called and held, so the quarantine panel shows
both. The page is then photographed: the top (totals, charts, workers), the Guard House down to
the quarantine, and the quarantine panel alone.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tokengate import AnomalyRule, OperationsCoordinator, TaskSpec, Token, task_token_guard
from tokengate.demos.cpu import fibonacci_operation

WIDTH, HEIGHT = 1280, 1180
KNOWN_SYMBOLS = {"ACME", "GLOBX", "INITECH", "UMBRL"}


@task_token_guard(operation_type="resize_image", tags={"weight": "light"})
def resize_image(pixels: bytes) -> int:
    time.sleep(0.004)
    return len(pixels) // 4


@task_token_guard(operation_type="fetch_quote", tags={"storage_speed": "FAST"})
def fetch_quote(symbol: str) -> float:
    time.sleep(0.003)
    if random.random() < 0.2:
        raise ConnectionError(f"quote service timed out for {symbol}")
    return 100.0


def unknown_symbol(spec: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    symbol = args[0] if args else kwargs.get("symbol")
    return None if symbol in KNOWN_SYMBOLS else f"symbol {symbol!r} is not on the allow-list"


def workload(stop: threading.Event) -> None:
    image = bytes(2_000_000)
    symbols = sorted(KNOWN_SYMBOLS)
    while not stop.is_set():
        tokens: list[Token[Any]] = [resize_image(image) for _ in range(40)]
        tokens += [fetch_quote(random.choice(symbols)) for _ in range(10)]
        tokens += [fibonacci_operation(random.randint(20_000, 60_000)) for _ in range(2)]
        for token in tokens:
            token.exception(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    options = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with OperationsCoordinator(workers_per_core=4) as coordinator:
        coordinator.hold_when(AnomalyRule(time_factor=None), operation="resize_image")
        coordinator.hold_when(unknown_symbol, operation="fetch_quote")
        stop = threading.Event()
        producer = threading.Thread(target=workload, args=(stop,), daemon=True)
        producer.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=options.chromium, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            page.goto(coordinator.serve_dashboard())
            page.wait_for_selector("#status.live")
            page.wait_for_timeout(6_000)  # let the charts and the history fill
            held: list[Token[Any]] = [resize_image(bytes(80_000_000)), fetch_quote("XXXX")]
            page.wait_for_selector(f"#quarantine tr[data-token='{held[0].id}']")
            page.fill("#lookup-id", held[0].id)
            page.click("#lookup")
            page.evaluate("window.scrollTo(0, 0)")  # the click scrolled to the look-up
            page.wait_for_timeout(3_000)
            options.out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(options.out / "dashboard-overview.png"))
            page.evaluate(
                "window.scrollTo(0, document.querySelector('#guard-house')"
                ".closest('section').offsetTop - 12)"
            )
            page.wait_for_timeout(1_000)
            page.screenshot(path=str(options.out / "dashboard-guard-house.png"))
            page.locator("#quarantine").locator("xpath=..").screenshot(
                path=str(options.out / "dashboard-quarantine.png")
            )
            browser.close()
        stop.set()
        producer.join(timeout=120)
        for token in held:
            coordinator.reject(token, "screenshots taken")
    sys.stdout.write(f"wrote 3 screenshots to {options.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
