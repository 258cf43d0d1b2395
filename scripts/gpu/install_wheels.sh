#!/usr/bin/env bash
# Installs carried wheel sets on a GPU test machine (Python 3.12 + torch only) into SITE, a folder
# outside the repository; then `export PYTHONPATH=SITE:$PWD`. Wheels of the same distribution in
# several sets are installed once (the first set named wins), so pip never sees two versions.
#   bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels /tmp/parts/deps /tmp/parts/nodeps
set -euo pipefail
site=${1:?usage: $0 SITE WHEEL_DIR...}; shift
mkdir -p "$site"
mapfile -t wheels < <(python3 - "$@" <<'PY'
import re, sys
from pathlib import Path
seen = {}
for d in sys.argv[1:]:
    for w in sorted(Path(d).glob("*.whl")):
        name = re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower()
        seen.setdefault(name, w)
print("\n".join(str(w) for w in seen.values()))
PY
)
python3 -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}"
echo "installed ${#wheels[@]} wheels into $site"
