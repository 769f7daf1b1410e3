#!/bin/sh
# Vendors TradingView's lightweight-charts (Apache-2.0) into the dashboard's static files, so
# that `make run` needs no network: `npm pack` of the pinned version, its sha512 checked against
# the pinned integrity (the registry's `dist.integrity`), then the standalone production build,
# its LICENSE and NOTICE copied. The copied files are committed; run this (`make vendor`) only to
# change the version, with the new integrity from `npm view lightweight-charts@X.Y.Z dist.integrity`.
set -eu

VERSION=5.3.0
INTEGRITY=sha512-w16fu2/FteUkIJdgc9G2tOCKs1fwFSqnqF8+kMgHGv0uGIfcfpEJhziSaQbML1yrkbeg4nQXV3msjmhBzhLNhw==
DEST="$(cd "$(dirname "$0")/.." && pwd)/realtime/static/realtime/vendor"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "lightweight-charts@$VERSION" >/dev/null)
tarball="$work/lightweight-charts-$VERSION.tgz"
actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | openssl base64 -A)"
if [ "$actual" != "$INTEGRITY" ]; then
    echo "lightweight-charts $VERSION: integrity $actual, expected $INTEGRITY" >&2
    exit 1
fi
tar -xzf "$tarball" -C "$work"
mkdir -p "$DEST"
cp "$work/package/dist/lightweight-charts.standalone.production.js" "$DEST/"
cp "$work/package/LICENSE" "$DEST/lightweight-charts.LICENSE"
if [ -f "$work/package/NOTICE" ]; then
    cp "$work/package/NOTICE" "$DEST/lightweight-charts.NOTICE"
fi
echo "lightweight-charts $VERSION ($INTEGRITY) -> $DEST"
