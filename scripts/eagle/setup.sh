#!/usr/bin/env bash
# Installs what the EAGLE scripts need (PyTorch, numpy, gguf, safetensors, transformers for
# the tokenizer and chat template) into a project-local venv, once: .dev/eagle-venv.
# Then: .dev/eagle-venv/bin/python scripts/eagle/<script>.py ...
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.dev/eagle-venv
if "$VENV/bin/python" -c "import torch, numpy, gguf, safetensors, transformers, jinja2" >/dev/null 2>&1; then
    echo "$VENV is ready"
    exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch numpy gguf safetensors transformers jinja2
"$VENV/bin/python" -c "import torch; print('$VENV: torch', torch.__version__, '(cuda available:', torch.cuda.is_available(), ')')"
