#!/usr/bin/env bash
# Set up clip-distill on a fresh Debian machine: the Debian data packages, a venv, PyTorch and
# the package with its test extra, at the versions CI last tested (tools/constraints.txt). Safe to rerun.
# Usage: bash tools/setup.sh
#   VENV=DIR        the venv to create or update (default .venv)
#   CONSTRAINTS=    empty: install the newest releases instead of the tested set (tools/upgrade_deps.sh does)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS-tools/constraints.txt}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Real offline data sets, installed from Debian packages: Fashion-MNIST, Tux Paint stamps, and an English
# word list (wamerican) for the text corpus of the offline experiment.
need_apt=""
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need_apt="$need_apt dataset-fashion-mnist"
dpkg -s tuxpaint-stamps-default >/dev/null 2>&1 || need_apt="$need_apt tuxpaint-stamps-default"
dpkg -s wamerican >/dev/null 2>&1 || need_apt="$need_apt wamerican"
# The general image pool (distill.pool, data=offline_pool): wallpapers and Wesnoth's art, about 260 MB.
for p in mate-backgrounds gnome-backgrounds ukui-wallpapers lomiri-wallpapers-20.04 wesnoth-1.16-data; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt="$need_apt $p"
done
dpkg -s nodejs >/dev/null 2>&1 || need_apt="$need_apt nodejs"
# The bundle's browser page: npm fetches its runtime (onnxruntime-web), headless Chromium tests it.
command -v npm >/dev/null 2>&1 || dpkg -s npm >/dev/null 2>&1 || need_apt="$need_apt npm"
dpkg -s chromium-headless-shell >/dev/null 2>&1 || need_apt="$need_apt chromium-headless-shell"
if [ -n "$need_apt" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need_apt
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# PyTorch first, at a version this machine serves from local disk (other versions download GBs).
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  case "$(uname -m)" in
    aarch64) "$VENV/bin/python" -m pip install -q torch==2.9.1 torchvision==0.24.1 ;;
    *)       "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 ;;
  esac
fi
if [ -n "$CONSTRAINTS" ]; then
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[dev]"
else
  "$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
fi
# onnxruntime-web at the version distill/web/package-lock.json pins; write_bundle copies it into bundle/web/ort/
[ -f distill/web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm ] || \
  npm ci --prefix distill/web --no-audit --no-fund --loglevel=error
echo "setup done: $VENV ready"
