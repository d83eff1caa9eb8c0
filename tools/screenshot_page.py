"""Screenshot a report.html / evaluation.html with the page tests' headless Chromium (network off), for the README.

    python tools/screenshot_page.py results/demo/report.html docs/report.png [--width 1320 --height 1500 --scale 0.6]

The PNG is downscaled and palette-quantised to stay small (needs Pillow, which matplotlib brings).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser import chromium, load  # noqa: E402


def main() -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1320)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--scale", type=float, default=0.6)
    ap.add_argument("--colors", type=int, default=128)
    args = ap.parse_args()
    with chromium(args.width, args.height) as driver:
        seen = load(driver, Path(args.page))
        if seen["console"] or seen["failed"]:
            print(f"page problems: {seen['console']} {seen['failed']}", file=sys.stderr)
            return 1
        png = driver.get_screenshot_as_png()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((round(img.width * args.scale), round(img.height * args.scale)), Image.LANCZOS)
    img = img.quantize(colors=args.colors, method=Image.Quantize.FASTOCTREE)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.png, optimize=True)
    print(f"wrote {args.png} ({Path(args.png).stat().st_size // 1024} KiB, {img.width}x{img.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
