#!/usr/bin/env bash
# Fetches Prometheus and promtool from the Debian package (bookworm: 2.42) into .cache/prometheus/
# and prints the folder that holds the two binaries. Idempotent: an unpacked copy is reused.
#   scripts/get-prometheus.sh            -> /abs/path/.cache/prometheus/root/usr/bin
#   PROMETHEUS_DEB_VERSION=2.42.0+ds-5+deb12u1 scripts/get-prometheus.sh   (pin one version)
# Needs apt-get and dpkg (Debian/Ubuntu) and a reachable Debian package mirror; messages go to
# stderr, the folder alone to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${PROMETHEUS_CACHE:-.cache/prometheus}
bindir=$cache/root/usr/bin
fail() { echo "get-prometheus: $*" >&2; exit 1; }

if [ -x "$bindir/prometheus" ] && [ -x "$bindir/promtool" ]; then
  (cd "$bindir" && pwd)
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found: this script needs a Debian/Ubuntu host"
command -v dpkg >/dev/null 2>&1 || fail "dpkg not found: this script needs a Debian/Ubuntu host"

pkg=prometheus${PROMETHEUS_DEB_VERSION:+=$PROMETHEUS_DEB_VERSION}
mkdir -p "$cache/deb"
if command -v flock >/dev/null 2>&1; then  # two test runs at once: the second waits, then reuses
  exec 9>"$cache/.lock"
  flock -w 300 9 || fail "timed out waiting for $cache/.lock"
  if [ -x "$bindir/prometheus" ] && [ -x "$bindir/promtool" ]; then (cd "$bindir" && pwd); exit 0; fi
fi
rm -f "$cache"/deb/*.deb
download() { (cd "$cache/deb" && apt-get download "$pkg") >&2; }
if ! download; then
  # an empty package list (fresh container) is the usual cause; refreshing it needs root
  if [ "$(id -u)" = 0 ] && apt-get update >&2 && download; then :; else
    fail "'apt-get download $pkg' failed: no reachable Debian mirror or an outdated package list \
(run 'sudo apt-get update' and retry)"
  fi
fi
deb=$(ls "$cache"/deb/*.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || fail "apt-get download produced no .deb in $cache/deb"

tmp=$(mktemp -d "$cache/unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
dpkg -x "$deb" "$tmp" || fail "dpkg -x $deb failed"
[ -x "$tmp/usr/bin/prometheus" ] && [ -x "$tmp/usr/bin/promtool" ] \
  || fail "$deb holds no usr/bin/prometheus and usr/bin/promtool"
"$tmp/usr/bin/promtool" --version >/dev/null 2>&1 || fail "the unpacked promtool does not run"
rm -rf "$cache/root"
mv "$tmp" "$cache/root"
trap - EXIT
echo "get-prometheus: $(basename "$deb") unpacked into $cache/root" >&2
(cd "$bindir" && pwd)
