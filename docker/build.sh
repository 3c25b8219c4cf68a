#!/usr/bin/env bash
# Build ranklog's collector and rank images without network access from the builds.
#
#   1. base image: $RANKLOG_BASE_IMAGE (default ranklog/python:3.11-bookworm), used as is
#      when present locally. A missing ranklog/* name is made here by base-image.sh
#      (debootstrap, as root); where debootstrap cannot run, build.sh pulls
#      $RANKLOG_FALLBACK_BASE_IMAGE (python:3.11-slim) and builds on that. Any other missing
#      name (python:3.11-slim) is pulled from your registry.
#   2. wheels: wheels.sh downloads them on the host into docker/.build/wheels.
#   3. images: ranklog/collector:$RANKLOG_TAG and ranklog/rank:$RANKLOG_TAG (tag: latest).
#
#   bash docker/build.sh               # all three stages
#   bash docker/build.sh --base-only   # stage 1 only; prints the base image's name
#
# Exit status: 0 built; 69 (EX_UNAVAILABLE) this host cannot get a base image at all (no
# Docker engine, or neither debootstrap nor a registry): the compose test skips on it, with
# the "build.sh: UNAVAILABLE:" line as the reason; anything else is a real failure (a
# broken Dockerfile, debootstrap failing, a wheel missing).
#
# Idempotent; unchanged inputs hit the local layer cache. Prints each stage's duration.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LOCAL_BASE=ranklog/python:3.11-bookworm
BASE=${RANKLOG_BASE_IMAGE:-$LOCAL_BASE}
FALLBACK_BASE=${RANKLOG_FALLBACK_BASE_IMAGE:-python:3.11-slim}
PULL_TIMEOUT=${RANKLOG_PULL_TIMEOUT:-300}
TAG=${RANKLOG_TAG:-latest}
UNAVAILABLE=69  # EX_UNAVAILABLE: no base image can be had here; see the header

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
unavailable() { say "UNAVAILABLE: $*"; exit "$UNAVAILABLE"; }

# docker pull "$1"; on failure, its last error line in $PULL_ERROR.
PULL_ERROR=
pull() {
    local out
    if out=$(timeout "$PULL_TIMEOUT" docker pull "$1" 2>&1); then
        say "pulled $1"
        return 0
    fi
    PULL_ERROR=$(tail -n 1 <<<"$out")
    [[ -n "$PULL_ERROR" ]] || PULL_ERROR="no answer within ${PULL_TIMEOUT}s"
    return 1
}

# Why base-image.sh cannot run here, or nothing when it can.
debootstrap_problem() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        echo "debootstrap is not installed"
    elif [[ $(id -u) != 0 ]]; then
        echo "debootstrap needs root"
    fi
}

stage() {
    local name=$1 started=$SECONDS
    shift
    say "-- $name"
    "$@"
    say "-- $name: done in $((SECONDS - started))s"
}

# Sets BASE to the image the Dockerfiles build on, making or pulling it when missing.
base_image() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        say "$BASE is present"
        return 0
    fi
    if [[ "$BASE" != ranklog/* ]]; then
        # Pulled here rather than by docker build, so that no registry is told apart from a
        # broken Dockerfile.
        say "$BASE is not local; pulling it"
        pull "$BASE" || unavailable "no base image: $BASE is not local and docker pull" \
            "failed ($PULL_ERROR)"
        return 0
    fi
    # A ranklog/* base never comes from a registry: base-image.sh makes it with debootstrap.
    local problem
    problem=$(debootstrap_problem)
    if [[ -z "$problem" ]]; then
        RANKLOG_BASE_IMAGE=$BASE bash "$HERE/base-image.sh"
        return 0
    fi
    say "$BASE is not local and base-image.sh cannot make it ($problem);" \
        "trying $FALLBACK_BASE from a registry instead"
    if docker image inspect "$FALLBACK_BASE" >/dev/null 2>&1 || pull "$FALLBACK_BASE"; then
        say "building on $FALLBACK_BASE"
        BASE=$FALLBACK_BASE
        return 0
    fi
    unavailable "no base image: $BASE is not local, base-image.sh cannot make it" \
        "($problem; as root: apt-get install debootstrap) and docker pull $FALLBACK_BASE" \
        "failed ($PULL_ERROR)"
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
    local base_only=0
    case "${1:-}" in
        "") ;;
        --base-only) base_only=1 ;;
        *) die "unknown argument ${1} (usage: build.sh [--base-only])" ;;
    esac
    command -v docker >/dev/null || unavailable "docker is not installed (run docker/engine.sh)"
    timeout 20 docker info >/dev/null 2>&1 \
        || unavailable "no Docker engine answers (run docker/engine.sh)"
    mkdir -p "$HERE/.build"
    local started=$SECONDS
    stage "base image" base_image  # in this shell: it may set BASE
    if ((base_only)); then
        echo "$BASE"
        return 0
    fi
    stage "wheels" bash "$HERE/wheels.sh"
    stage "collector image" image collector
    stage "rank image" image rank
    say "images ready in $((SECONDS - started))s"
}

main "$@"
