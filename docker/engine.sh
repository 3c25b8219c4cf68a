#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the compose test (called by .ci/run).
#
# Installs Debian's docker.io, docker-compose and debootstrap when missing (one apt-get
# update), starts dockerd in the background when nothing answers, and waits for it.
# Idempotent: on a machine whose engine already answers it only says so.
#
# An engine that cannot start is reported loudly but is not an error: `make test` then
# skips the compose test with the reason. RANKLOG_REQUIRE_DOCKER=1 (.ci/run sets it) makes
# it fatal instead.
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/ranklog-dockerd.log}
WAIT_S=${DOCKERD_WAIT_S:-60}
REQUIRE=${RANKLOG_REQUIRE_DOCKER:-0}

say() { printf 'engine.sh: %s\n' "$*" >&2; }

give_up() {
    say "ERROR: $*"
    if [[ "$REQUIRE" == 1 ]]; then
        exit 1
    fi
    say "continuing without a Docker engine; the compose test will be skipped"
    exit 0
}

as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"; else sudo -n "$@"; fi
}

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

install_missing() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    if ! command -v docker-compose >/dev/null 2>&1 \
        && ! timeout 10 docker compose version >/dev/null 2>&1; then
        missing+=(docker-compose)
    fi
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || give_up "need ${missing[*]} and there is no apt-get"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    as_root timeout 300 apt-get update -q >/dev/null || give_up "apt-get update failed"
    # --no-install-recommends keeps out recommends (e.g. ubuntu-fan, git) the engine does not need.
    as_root timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || give_up "apt-get install ${missing[*]} failed"
}

start_dockerd() {
    if pgrep -x dockerd >/dev/null 2>&1; then
        say "dockerd is already running; waiting for it to answer"
        return 0
    fi
    command -v dockerd >/dev/null 2>&1 || give_up "dockerd is not installed"
    say "starting dockerd in the background (log: $LOG)"
    as_root mkdir -p "$(dirname "$LOG")"
    # setsid + nohup: the engine outlives this script and the CI step that ran it.
    as_root setsid nohup dockerd >>"$LOG" 2>&1 </dev/null &
}

main() {
    command -v docker >/dev/null 2>&1 || install_missing
    if engine_answers; then
        install_missing
        say "Docker engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
        return 0
    fi
    install_missing
    start_dockerd
    local deadline=$((SECONDS + WAIT_S))
    until engine_answers; do
        if ((SECONDS >= deadline)); then
            tail -n 30 "$LOG" >&2 2>/dev/null || true
            give_up "the Docker engine did not answer within ${WAIT_S}s (log: $LOG)"
        fi
        sleep 1
    done
    say "Docker engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
}

main "$@"
