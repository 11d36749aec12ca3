#!/usr/bin/env bash
# Stage the pure-Python packages the GPU checks need but the lent GPU machine's image lacks, for the
# device tool's `carry`. That image has Python 3.12 with torch, torchvision, timm, huggingface_hub,
# safetensors, regex, pyyaml, tqdm, onnx, onnxruntime and pytest (/work/.library/device/KINDS.md);
# it has no open_clip, hydra-core, omegaconf, antlr4 or ftfy and cannot fetch them. All of those are
# pure Python, so they are copied from this checkout's venv (built by tools/setup.sh), whatever its
# Python version, into .device_pkgs/ (git-ignored; about 10 MB).
#
#   bash tools/device_pkgs.sh
#   then run tools/gpu_check.sh there with carry [".device_pkgs"].
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
rm -rf .device_pkgs && mkdir -p .device_pkgs
for pkg in open_clip hydra omegaconf antlr4 ftfy wcwidth; do
    [ -d "$site/$pkg" ] || { echo "tools/device_pkgs.sh: $pkg is not in $site: run bash tools/setup.sh first" >&2; exit 1; }
    cp -r "$site/$pkg" .device_pkgs/
done
# their metadata too, so importlib.metadata (the reports' version lines) sees them
for dist in open_clip_torch hydra_core omegaconf antlr4_python3_runtime ftfy wcwidth; do
    cp -r "$site/$dist"-*.dist-info .device_pkgs/
done
find .device_pkgs -name __pycache__ -type d -prune -exec rm -rf {} +
du -sh .device_pkgs
