#!/usr/bin/env bash
# Install impure_hf (editable) with optional extras, e.g. `bash install.sh test` or `bash install.sh test,app`.
# torchattacks 3.5.1 pins requests~=2.25.1, which conflicts with the Hugging Face stack although it never uses
# it, and foolbox is needed only for its 20 labelled ImageNet photos (importing it needs GitPython): both are
# installed without their dependencies. Everything they do need (torch, scipy, tqdm, numpy) is a core dependency.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
python -m pip install -q -e ".${extras:+[$extras]}"
python -m pip install -q --no-deps "torchattacks==3.5.1" "foolbox==3.3.4"
