#!/usr/bin/env bash
# Build ranklog's collector and rank images without network access from the builds.
#
#   1. base image: $RANKLOG_BASE_IMAGE (default ranklog/python:3.11-bookworm). Used as is
#      when present locally; the default is made by base-image.sh (debootstrap) when
#      missing; any other name (python:3.11-slim) is left for `docker build` to pull.
#   2. wheels: wheels.sh downloads them on the host into docker/.build/wheels.
#   3. images: ranklog/collector:$RANKLOG_TAG and ranklog/rank:$RANKLOG_TAG (tag: latest).
#
# Idempotent; unchanged inputs hit the local layer cache. Prints each stage's duration.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LOCAL_BASE=ranklog/python:3.11-bookworm
BASE=${RANKLOG_BASE_IMAGE:-$LOCAL_BASE}
TAG=${RANKLOG_TAG:-latest}

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

stage() {
    local name=$1 started=$SECONDS
    shift
    say "-- $name"
    "$@"
    say "-- $name: done in $((SECONDS - started))s"
}

base_image() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        say "$BASE is present"
    elif [[ "$BASE" == "$LOCAL_BASE" ]]; then
        RANKLOG_BASE_IMAGE=$BASE bash "$HERE/base-image.sh"
    else
        say "$BASE is not local; docker build pulls it from your registry"
    fi
}

image() {
    local kind=$1 log=$HERE/.build/build-$1.log
    # The classic builder is enough (no BuildKit features); quiet output goes to a log.
    if ! DOCKER_BUILDKIT=0 timeout 900 docker build --build-arg "BASE_IMAGE=$BASE" \
        -f "$HERE/$kind.Dockerfile" -t "ranklog/$kind:$TAG" "$HERE" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "docker build of ranklog/$kind:$TAG failed (log: $log)"
    fi
    say "ranklog/$kind:$TAG $(docker image inspect -f '{{.Id}}' "ranklog/$kind:$TAG" | cut -c8-19)," \
        "$(( $(docker image inspect -f '{{.Size}}' "ranklog/$kind:$TAG") / 1000000 )) MB"
}

main() {
    command -v docker >/dev/null || die "docker is not installed (run docker/engine.sh)"
    timeout 20 docker info >/dev/null 2>&1 || die "no Docker engine answers (run docker/engine.sh)"
    mkdir -p "$HERE/.build"
    local started=$SECONDS
    stage "base image" base_image
    stage "wheels" bash "$HERE/wheels.sh"
    stage "collector image" image collector
    stage "rank image" image rank
    say "images ready in $((SECONDS - started))s"
}

main "$@"
