#!/usr/bin/env bash
# The web chat's two libraries, vendored under services/gateway/static/vendor/ so the page
# works offline and is served from the gateway's own origin (its Content-Security-Policy
# allows scripts from 'self' only):
#   marked     markdown → HTML           (MIT)
#   dompurify  HTML → HTML without script (Apache-2.0 or MPL-2.0)
#
#   scripts/vendor-web.sh           fetch the pinned versions with `npm pack`, check every
#                                   file against its pinned sha256, copy them into vendor/
#   scripts/vendor-web.sh --check   check the committed files against the pins (no network)
#
# To move to a new version: change VERSION below, run with UPDATE=1 (prints the new hashes
# instead of refusing), read the libraries' changelogs, paste the hashes here, run the web
# tests (tests/e2e/test_web.py), commit vendor/ and this script together.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/services/gateway/static/vendor"

declare -A VERSION=([marked]=18.2.1 [dompurify]=3.5.0)
# package|file in its tarball|name under vendor/|sha256
FILES=(
  "marked|package/lib/marked.umd.js|marked.umd.js|bb95d4c15f1289f78486eaacebf3bb18688475ed58a040ef762ed49337090542"
  "marked|package/LICENSE|marked.LICENSE|8e3a3f82f59a60958f56ca08f445647c32a4733dc7ca6c2c46f6eb898471ab9c"
  "dompurify|package/dist/purify.min.js|purify.min.js|f69a46022ab1f53e969c8ebbca98172c8995785a9b3be72ea4a12d25b1a1bf67"
  "dompurify|package/LICENSE|dompurify.LICENSE|cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
  "dompurify|package/LICENSE-MPL|dompurify.LICENSE-MPL|fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85"
)

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ "${1:-}" == "--check" ]]; then
  bad=0
  for row in "${FILES[@]}"; do
    IFS='|' read -r _ _ name want <<<"$row"
    if [[ ! -f "$DEST/$name" ]]; then
      echo "missing: vendor/$name (run scripts/vendor-web.sh)" >&2
      bad=1
    elif [[ "$(sha "$DEST/$name")" != "$want" ]]; then
      echo "changed: vendor/$name does not match its pinned sha256 $want" >&2
      bad=1
    fi
  done
  [[ $bad == 0 ]] && echo "vendor/: ${#FILES[@]} files match their pins"
  exit $bad
fi

command -v npm >/dev/null || { echo "npm is needed to fetch the libraries (apt-get install -y npm)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for pkg in "${!VERSION[@]}"; do
  # npm checks the tarball against the registry's integrity hash itself
  (cd "$WORK" && npm pack --silent "$pkg@${VERSION[$pkg]}" >/dev/null)
  mkdir -p "$WORK/$pkg"
  tar -xzf "$WORK/$pkg-${VERSION[$pkg]}.tgz" -C "$WORK/$pkg"
done

bad=0
for row in "${FILES[@]}"; do
  IFS='|' read -r pkg path name want <<<"$row"
  got="$(sha "$WORK/$pkg/$path")"
  if [[ "$got" != "$want" ]]; then
    echo "$pkg@${VERSION[$pkg]} $path: sha256 $got, pinned $want" >&2
    bad=1
  fi
done
if [[ $bad == 1 && "${UPDATE:-0}" != 1 ]]; then
  echo "refusing to vendor files that differ from the pins (UPDATE=1 to take them and print new pins)" >&2
  exit 1
fi

mkdir -p "$DEST"
for row in "${FILES[@]}"; do
  IFS='|' read -r pkg path name _ <<<"$row"
  install -m 644 "$WORK/$pkg/$path" "$DEST/$name"
  echo "$pkg@${VERSION[$pkg]}|$path|$name|$(sha "$DEST/$name")"
done
