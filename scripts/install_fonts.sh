#!/usr/bin/env bash
# Install the Chinese fonts that rendered training and test lines use, from Debian's packages:
# WenQuanYi Micro Hei (fonts-wqy-microhei, a sans), AR PL UKai (fonts-arphic-ukai, a brush
# kaiti), AR PL SungtiL GB (fonts-arphic-gbsn00lp, a songti) and AR PL UMing
# (fonts-arphic-uming, a mingti). Does nothing when all four are there. Needs root (or sudo)
# and apt-get; elsewhere install the fonts yourself and pass their files to train.synth with
# --font.
# Usage: bash scripts/install_fonts.sh
set -euo pipefail
for font in /usr/share/fonts/truetype/wqy/wqy-microhei.ttc \
            /usr/share/fonts/truetype/arphic/ukai.ttc \
            /usr/share/fonts/truetype/arphic/uming.ttc \
            /usr/share/fonts/truetype/arphic-gbsn00lp/gbsn00lp.ttf; do
  if [ ! -f "$font" ]; then
    exec bash "$(dirname "$0")/apt_install.sh" install_fonts.sh fonts-wqy-microhei \
      fonts-arphic-ukai fonts-arphic-gbsn00lp fonts-arphic-uming
  fi
done
