#!/usr/bin/env bash
# The browser the dashboard tests drive: Debian's chromium and chromedriver. Installed when
# this runs as root with apt-get; otherwise those tests skip and say why.
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
        || echo "install-browser: apt-get install chromium chromium-driver failed; browser tests will skip"
else
    echo "install-browser: not root or no apt-get; browser tests will skip (install chromium and chromedriver)"
fi
exit 0
