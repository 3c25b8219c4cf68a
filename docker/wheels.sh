#!/usr/bin/env bash
# Download, on the host, every wheel the images install, so the image builds need no network.
#
#   docker/.build/wheels/project/    ranklog's own wheel (pip wheel --no-deps .)
#   docker/.build/wheels/collector/  ranklog[collector]'s dependencies (no torch)
#   docker/.build/wheels/rank/       ranklog's dependencies + CPU torch and its dependencies
#
# Versions come from constraints.txt; the wheels are for Linux x86_64 CPython 3.11, whatever
# the host runs. The torch wheel is $RANKLOG_TORCH_WHEEL (default: the CPU wheel on this
# machine's disk) or, when that file is absent, `torch` from pip's configured index.
# A dependency directory is replaced only when its contents changed, which keeps the image
# builds' layer cache warm across runs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/.build/wheels
TORCH_WHEEL=${RANKLOG_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}

say() { printf 'wheels.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

host_python() {
    local candidate
    for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3.11 python3; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -m pip --version >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# Target: the images' interpreter, not the host's. pip does not widen manylinux_2_Y to older
# glibc versions by itself, so list every one up to bookworm's glibc 2.36.
target_flags() {
    local y
    printf '%s\n' --only-binary=:all: --python-version 3.11 --implementation cp \
        --abi cp311 --abi abi3 --abi none
    for y in $(seq 36 -1 5); do printf '%s\n' --platform "manylinux_2_${y}_x86_64"; done
    printf '%s\n' --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
        --platform manylinux1_x86_64 --platform linux_x86_64
}

# pip download "$@" into a fresh directory; swap it in for $1 only when anything differs.
download_into() {
    local dest=$1 fresh flags
    shift
    mapfile -t flags < <(target_flags)
    fresh=$(mktemp -d "$OUT/.download.XXXXXX")
    local log=$HERE/.build/pip-download.log
    if ! timeout 900 "$PY" -m pip download -q --disable-pip-version-check --dest "$fresh" \
        -c "$ROOT/constraints.txt" --find-links "$OUT/project" "${flags[@]}" "$@" \
        >"$log" 2>&1; then
        rm -rf "$fresh"
        grep -v 'is neither a file nor a directory' "$log" | tail -n 30 >&2 || true
        die "pip download failed for: $* (log: $log)"
    fi
    rm -f "$fresh"/ranklog-*.whl  # the project wheel has its own directory and layer
    if [[ -d "$dest" ]] && diff -rq "$dest" "$fresh" >/dev/null 2>&1; then
        rm -rf "$fresh"
        say "$(basename "$dest"): unchanged ($(find "$dest" -name '*.whl' | wc -l) wheels)"
    else
        rm -rf "$dest"
        mv "$fresh" "$dest"
        say "$(basename "$dest"): $(find "$dest" -name '*.whl' | wc -l) wheels," \
            "$(du -sh "$dest" | cut -f1)"
    fi
}

main() {
    PY=$(host_python) || die "need a Python with pip on the host (set PYTHON=...)"
    mkdir -p "$OUT"
    rm -rf "$OUT"/.download.*  # left by an interrupted run
    local started=$SECONDS

    # Build from a copy: building in the checkout would leave build/ and *.egg-info behind.
    local stage=$HERE/.build/src
    rm -rf "$stage"
    mkdir -p "$stage"
    cp "$ROOT/pyproject.toml" "$stage/"
    for f in "$ROOT"/README* "$ROOT"/LICENSE* "$ROOT"/NOTICE*; do
        [[ -f "$f" ]] && cp "$f" "$stage/"
    done
    tar -C "$ROOT" --exclude=__pycache__ --exclude='*.egg-info' -c src | tar -C "$stage" -x
    rm -rf "$OUT/project.new"
    timeout 300 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps \
        -w "$OUT/project.new" "$stage" >"$HERE/.build/pip-wheel.log" 2>&1 \
        || { cat "$HERE/.build/pip-wheel.log" >&2; die "pip wheel of the project failed"; }
    rm -rf "$OUT/project" "$stage"
    mv "$OUT/project.new" "$OUT/project"
    local project version
    project=$(basename "$OUT"/project/ranklog-*.whl)
    version=$(cut -d- -f2 <<<"$project")
    say "project: $project"

    download_into "$OUT/collector" "ranklog[collector]==$version"

    local torch=torch
    if [[ -f "$TORCH_WHEEL" ]]; then
        torch=$TORCH_WHEEL
    else
        say "no $TORCH_WHEEL; taking torch from pip's index (set RANKLOG_TORCH_WHEEL to a CPU wheel)"
    fi
    # numpy: torch warns at import without it
    download_into "$OUT/rank" "ranklog==$version" "$torch" numpy
    say "done in $((SECONDS - started))s"
}

main "$@"
