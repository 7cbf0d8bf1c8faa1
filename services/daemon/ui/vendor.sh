#!/bin/sh
# Fetch the web UI's vendored JavaScript from the npm registry and keep only what is served:
# the minified files and each package's licence. Run by `make vendor-ui`; the result is
# committed, so neither a build step nor the network is needed to serve the UI.
#
#   sh services/daemon/ui/vendor.sh
#
# The versions are pinned here; change them here and in static/vendor/README.md together.
set -eu

HTMX=htmx.org@2.0.11
HTMX_SSE=htmx-ext-sse@2.2.4
UPLOT=uplot@1.6.32

here=$(cd "$(dirname "$0")" && pwd)
dest="$here/static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "$HTMX" "$HTMX_SSE" "$UPLOT" >/dev/null
for tgz in *.tgz; do
    mkdir "${tgz%.tgz}"
    tar xzf "$tgz" -C "${tgz%.tgz}"
done

mkdir -p "$dest"
cp htmx.org-*/package/dist/htmx.min.js            "$dest/htmx.min.js"
cp htmx.org-*/package/LICENSE                     "$dest/htmx.LICENSE"
cp htmx-ext-sse-*/package/dist/sse.min.js         "$dest/htmx-ext-sse.min.js"
cp htmx-ext-sse-*/package/LICENSE                 "$dest/htmx-ext-sse.LICENSE"
cp uplot-*/package/dist/uPlot.iife.min.js         "$dest/uPlot.iife.min.js"
cp uplot-*/package/dist/uPlot.min.css             "$dest/uPlot.min.css"
cp uplot-*/package/LICENSE                        "$dest/uPlot.LICENSE"
echo "vendored into $dest:"
ls -l "$dest"
