"""Makes `dvc plots show` / `dvc plots diff` pages draw without a network.

DVC's default page loads vega, vega-lite and vega-embed from a CDN: offline (or behind a proxy)
it stays blank. This writes ``.dvc/plots/offline.html``, the page template that .dvc/config names
(``plots.html_template``), with the three libraries inlined: the pinned npm packages, fetched
from the npm registry (``NPM_CONFIG_REGISTRY`` wins) and checked against their published
integrity. Every page DVC writes from it is then self-contained.

Run by ``make install``; on its own: ``python tools/offline_plots.py``. Without a network it
writes a template that uses the CDN, as DVC does, and says so.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

#: npm package -> (version, its browser build, the registry's sha512 integrity of the tarball).
PACKAGES = {
    "vega": ("5.33.1", "build/vega.min.js",
             "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    "vega-lite": ("5.23.0", "build/vega-lite.min.js",
                  "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    "vega-embed": ("6.29.0", "build/vega-embed.min.js",
                   "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
}
TEMPLATE = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"
STAMP = "l2sweep offline plots: " + ", ".join(f"{name} {v[0]}" for name, v in PACKAGES.items())
CDN_SCRIPTS = "\n".join(f'<script src="https://cdn.jsdelivr.net/npm/{name}@{v[0]}"></script>'
                        for name, v in PACKAGES.items())
# dvc-render fills {refresh_tag} and {plot_divs} (str.replace, not str.format: braces are safe).
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- @STAMP@ -->
    @SCRIPTS@
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str, version: str, path: str, integrity: str) -> str:
    """``path`` of the npm package ``name@version``, after checking the tarball's integrity."""
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        tarball = response.read()
    got = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if got != integrity:
        raise ValueError(f"{url}: integrity {got}, expected {integrity}")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        member = archive.extractfile(f"package/{path}")
        if member is None:
            raise ValueError(f"{url}: no package/{path}")
        return member.read().decode()


def inline(name: str, code: str) -> str:
    """``code`` as an inline script (a ``</script`` in a string literal would end it early)."""
    code = code.replace("</script", "<\\/script")
    return f"<script>/* {name} {PACKAGES[name][0]} */\n{code}\n</script>"


def main() -> int:
    if TEMPLATE.is_file() and STAMP in TEMPLATE.read_text():
        return 0
    try:
        scripts = "\n".join(inline(name, fetch(name, *spec)) for name, spec in PACKAGES.items())
        stamp = STAMP
    except (OSError, ValueError) as exc:
        print(f"offline plots: could not fetch vega from the npm registry ({exc}); `dvc plots show` "
              "pages will load it from the CDN. Run `python tools/offline_plots.py` again online.",
              file=sys.stderr)
        scripts, stamp = CDN_SCRIPTS, "vega from the CDN (tools/offline_plots.py could not fetch it)"
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(PAGE.replace("@STAMP@", stamp).replace("@SCRIPTS@", scripts))
    print(f"offline plots: {TEMPLATE} ({'; '.join(f'{n} {v[0]}' for n, v in PACKAGES.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
