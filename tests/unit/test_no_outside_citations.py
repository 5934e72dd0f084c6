"""Code and docs cite only what is in this repository.

The house notes the project grew from (a style sheet and a design sketch) are not part of
it; a comment or doc page that points a reader there points at nothing. What matters from
them is written where it applies. The names are built from parts so this file does not
match itself."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMES = tuple(stem + "." + "md" for stem in ("STY" + "LE", "DES" + "IGN"))


def _tracked_files() -> list[Path]:
    # tracked files, and new ones not yet added that git does not ignore
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def _citations(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if any(name in line for name in NAMES)]


def test_no_tracked_file_cites_the_outside_notes():
    bad = []
    for path in _tracked_files():
        if not path.is_file():
            continue  # listed by git but deleted in the working tree
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images, weights
        bad += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in _citations(text)]
    assert not bad, "cites a file outside the repository:\n" + "\n".join(bad)


def test_the_check_sees_a_citation():
    text = "ok\n# health means ready (" + NAMES[0] + " #7)\n"
    assert _citations(text) == [(2, "# health means ready (" + NAMES[0] + " #7)")]
