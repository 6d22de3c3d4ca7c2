#!/usr/bin/env bash
# Install the Chinese fonts that rendered training and test lines use, from Debian's packages:
# WenQuanYi Micro Hei (fonts-wqy-microhei, a sans), AR PL UKai (fonts-arphic-ukai, a brush
# kaiti), AR PL SungtiL GB (fonts-arphic-gbsn00lp, a songti) and AR PL UMing
# (fonts-arphic-uming, a mingti). Does nothing when all four are there. Needs root (or sudo)
# and apt-get; elsewhere install the fonts yourself and pass their files to train.synth with
# --font.
# Usage: bash scripts/install_fonts.sh
set -euo pipefail
fonts=(/usr/share/fonts/truetype/wqy/wqy-microhei.ttc
       /usr/share/fonts/truetype/arphic/ukai.ttc
       /usr/share/fonts/truetype/arphic/uming.ttc
       /usr/share/fonts/truetype/arphic-gbsn00lp/gbsn00lp.ttf)
missing=0
for font in "${fonts[@]}"; do
  [ -f "$font" ] || missing=1
done
[ "$missing" = 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_fonts.sh: no apt-get here; install WenQuanYi Micro Hei, AR PL UKai, AR PL SungtiL GB and AR PL UMing yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install_fonts.sh: needs root or sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo "installing fonts-wqy-microhei, fonts-arphic-ukai, fonts-arphic-gbsn00lp and fonts-arphic-uming (apt-get)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fonts-wqy-microhei \
  fonts-arphic-ukai fonts-arphic-gbsn00lp fonts-arphic-uming >/dev/null
