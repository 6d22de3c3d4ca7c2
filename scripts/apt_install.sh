#!/usr/bin/env bash
# Install Debian packages with apt-get, as root or through sudo: the one place the install
# scripts (install_browser.sh, install_fonts.sh) go through. Fails with one line where there
# is no apt-get, or neither root nor sudo.
# Usage: bash scripts/apt_install.sh WHO PACKAGE...   (WHO names the caller in messages)
set -euo pipefail
who=$1
shift
if ! command -v apt-get >/dev/null; then
  echo "$who: no apt-get here; install $* yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "$who: needs root or sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo "$who: installing $* (apt-get; a minute or two)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
