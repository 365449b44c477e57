"""Print the Debian archive this host's apt uses for a suite (scripts/docker-smoke builds its base image from it).

    python3 scripts/apt_mirror.py [SUITE] [--root DIR]       # SUITE: bookworm by default

Reads /etc/apt/sources.list and /etc/apt/sources.list.d/*.list (one-line format) and *.sources (deb822),
as apt does; entries of type `deb` with the suite itself (not SUITE-updates, not SUITE-security) and the
`main` component count, and the first one wins. Exit status 1 when there is none. No host name is built in:
the mirror is whatever the host's apt is configured with (a proxy, an internal mirror...).
Standard library only: it runs with the host's python3, before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _one_line_entries(text: str):
    """(types, uris, suites, components) of each line of a sources.list file."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        kind, rest = tokens[0], tokens[1:]
        if rest and rest[0].startswith("["):  # [arch=amd64 signed-by=...] options
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            yield [kind], [rest[0]], [rest[1]], rest[2:]


def _deb822_entries(text: str):
    """(types, uris, suites, components) of each enabled paragraph of a .sources file."""
    paragraphs: list[dict[str, str]] = [{}]
    key = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if paragraphs[-1]:
                paragraphs.append({})
            key = None
            continue
        if raw[0] in " \t" and key is not None:  # a continuation line
            paragraphs[-1][key] += " " + raw.strip()
        elif ":" in raw:
            key, value = raw.split(":", 1)
            key = key.strip().lower()
            paragraphs[-1][key] = value.strip()
    for p in paragraphs:
        if p and p.get("enabled", "yes").lower() not in ("no", "false", "0"):
            yield (p.get("types", "").split(), p.get("uris", "").split(), p.get("suites", "").split(),
                   p.get("components", "").split())


def sources(root: Path = Path("/")):
    """Every apt source entry of the host under `root`, in apt's reading order."""
    etc = root / "etc" / "apt"
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.name.endswith(".list"):
            yield from _one_line_entries(text)
        elif path.name.endswith(".sources"):
            yield from _deb822_entries(text)


def debian_mirror(suite: str = "bookworm", root: Path = Path("/")) -> str | None:
    """The URI of the host's first `deb` source for `suite` with component `main`, or None."""
    for types, uris, suites, components in sources(root):
        if "deb" in types and suite in suites and "main" in components and uris:
            return uris[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="bookworm")
    parser.add_argument("--root", type=Path, default=Path("/"), help="read DIR/etc/apt instead of /etc/apt")
    args = parser.parse_args(argv)
    mirror = debian_mirror(args.suite, args.root)
    if mirror is None:
        print(f"apt_mirror: no `deb` source for {args.suite} (main) in {args.root / 'etc/apt'}", file=sys.stderr)
        return 1
    print(mirror)
    return 0


if __name__ == "__main__":
    sys.exit(main())
