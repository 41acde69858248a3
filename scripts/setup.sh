#!/usr/bin/env bash
# Installs what vgskit needs on a Debian machine: the TTS voices and Fashion-MNIST used by the embedded
# spoken-scenes corpus, then the Python package itself (with the extras named in $1, e.g. "test").
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
apt_packages=(espeak-ng flite sox dataset-fashion-mnist)
# The test suite drives the search page in a real browser (tests/test_serve_page.py).
case ",$extras," in
  *,test,*) apt_packages+=(chromium chromium-driver) ;;
esac
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

# Debian's own Python marks itself externally managed; inside a virtualenv this variable has no effect.
export PIP_BREAK_SYSTEM_PACKAGES=1
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python3 -m pip install -q --disable-pip-version-check -e "$spec"
