#!/bin/sh
# Make sure headless Chromium is available for the browser test of `stageopt report`
# (tests/report/test_browser.py). Installs Debian's `chromium` package with apt-get when
# /usr/bin/chromium is missing and we are root or have password-less sudo; otherwise says
# so and exits 0 (the browser test then skips with that reason).
set -eu

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: $CHROMIUM is missing and apt-get is not available;" \
        "install Chromium yourself to run the browser test (it is skipped otherwise)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-chromium: $CHROMIUM is missing and installing it needs root;" \
        "run 'sudo apt-get install chromium' to run the browser test (it is skipped otherwise)"
    exit 0
fi

echo "ensure-chromium: installing Debian's chromium package (headless browser test of stageopt report) ..."
export DEBIAN_FRONTEND=noninteractive
# fonts-liberation: the page has text to render even on a machine without fonts.
PACKAGES="chromium fonts-liberation"
install() {
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}
if ! install; then
    # the package lists may be missing or stale: refresh them once and try again
    $SUDO apt-get update -qq || true
    install || echo "ensure-chromium: apt-get install $PACKAGES failed"
fi
if [ -x "$CHROMIUM" ]; then
    echo "ensure-chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
else
    echo "ensure-chromium: apt-get finished but $CHROMIUM is still missing; the browser test will be skipped"
fi
exit 0
