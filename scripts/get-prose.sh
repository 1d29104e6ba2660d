#!/usr/bin/env bash
# Fetches English prose for gate training and the accuracy suite: Debian documentation packages
# (default: python3.11-doc, debian-reference-en and six more English manuals: sqlite3, R, bash,
# PostgreSQL, Debian policy, developers reference; ~31 MB of text, enough held-out documents for 32
# windows of 8k tokens), unpacked with dpkg -x into .cache/prose/root/, their HTML pages turned into
# plain text (vllm_seer/eval/html_text.py, stdlib html.parser) in
# .cache/prose/text/<relpath>.txt, one file per HTML document. Prints the text folder.
# Idempotent: a finished copy (.cache/prose/text/.done) is reused.
#   scripts/get-prose.sh                                  -> /abs/path/.cache/prose/text
#   PROSE_PACKAGES="python3.11-doc" scripts/get-prose.sh   (another package list)
# Needs apt-get, dpkg, python3 and a reachable Debian package mirror. A package the mirror does not
# have is skipped with a warning; none at all is an error. Messages go to stderr, the folder to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${PROSE_CACHE:-.cache/prose}
packages=${PROSE_PACKAGES:-python3.11-doc debian-reference-en sqlite3-doc r-doc-html bash-doc postgresql-doc-15 debian-policy developers-reference}
text=$cache/text
PY=${PYTHON:-python3}
fail() { echo "get-prose: $*" >&2; exit 1; }

if [ -f "$text/.done" ]; then (cd "$text" && pwd); exit 0; fi
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found: this script needs a Debian/Ubuntu host"
command -v dpkg >/dev/null 2>&1 || fail "dpkg not found: this script needs a Debian/Ubuntu host"
command -v "$PY" >/dev/null 2>&1 || fail "$PY not found (set PYTHON=...)"

mkdir -p "$cache/deb"
if command -v flock >/dev/null 2>&1; then  # two runs at once: the second waits, then reuses
  exec 9>"$cache/.lock"
  flock -w 600 9 || fail "timed out waiting for $cache/.lock"
  if [ -f "$text/.done" ]; then (cd "$text" && pwd); exit 0; fi
fi
rm -f "$cache"/deb/*.deb
download() { (cd "$cache/deb" && apt-get download "$1") >&2; }
got=0
refreshed=0
for pkg in $packages; do
  if download "$pkg"; then got=$((got + 1)); continue; fi
  # an empty package list (fresh container) is the usual cause; refreshing it needs root
  if [ "$refreshed" = 0 ] && [ "$(id -u)" = 0 ]; then
    refreshed=1
    apt-get update >&2 || fail "'apt-get update' failed: no reachable Debian mirror"
    if download "$pkg"; then got=$((got + 1)); continue; fi
  fi
  echo "get-prose: warning: 'apt-get download $pkg' failed (not in this mirror?); skipped" >&2
done
[ "$got" -gt 0 ] || fail "none of the packages ($packages) could be downloaded: no reachable Debian \
mirror or an outdated package list (run 'sudo apt-get update' and retry)"

tmp=$(mktemp -d "$cache/unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for deb in "$cache"/deb/*.deb; do
  dpkg -x "$deb" "$tmp/root" || fail "dpkg -x $deb failed"
done
"$PY" vllm_seer/eval/html_text.py "$tmp/root" "$tmp/text" \
  || fail "no HTML documents found in the unpacked packages ($packages)"
touch "$tmp/text/.done"
rm -rf "$cache/root" "$text"
mv "$tmp/root" "$cache/root"
mv "$tmp/text" "$text"
rmdir "$tmp"
trap - EXIT
rm -f "$cache"/deb/*.deb
echo "get-prose: $(find "$text" -name '*.txt' | wc -l) documents from: $packages" >&2
(cd "$text" && pwd)
