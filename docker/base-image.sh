#!/usr/bin/env bash
# Make a local Python 3.11 base image for machines without a container registry.
#
# debootstrap's a minimal Debian bookworm (python3 + venv) from the Debian mirror this
# machine's apt sources already use and `docker import`s it as $RANKLOG_BASE_IMAGE
# (default ranklog/python:3.11-bookworm). Skips everything when that image exists.
# With a registry you do not need this: build with --build-arg BASE_IMAGE=python:3.11-slim.
set -euo pipefail

IMAGE=${RANKLOG_BASE_IMAGE:-ranklog/python:3.11-bookworm}
SUITE=${RANKLOG_DEBIAN_SUITE:-bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=$HERE/.build/debs

say() { printf 'base-image.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# The first mirror in /etc/apt/sources.list{,.d/*} (one-line or deb822 format) that serves
# "$SUITE" itself (not -security or -updates, not a third-party repository).
debian_mirror() {
    local files=()
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    awk -v suite="$SUITE" '
        # one-line format: deb [options] URI SUITE COMPONENTS...
        /^[[:space:]]*deb[[:space:]]/ {
            i = 2
            if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i + 1) == suite) { print $i; exit }
        }
        # deb822 format: a stanza of URIs:/Suites: fields, blank line between stanzas
        /^[[:space:]]*$/ { uris = ""; suites = "" }
        /^URIs:/   { uris = $2 }
        /^Suites:/ { suites = " " substr($0, 8) " " }
        uris != "" && suites ~ (" " suite " ") { print uris; exit }
    ' "${files[@]}"
}

main() {
    command -v docker >/dev/null || die "docker is not installed (run docker/engine.sh)"
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        say "$IMAGE exists; nothing to do"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap needs root; run as root (or: sudo $0)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local mirror
    mirror=$(debian_mirror) || true
    mirror=${RANKLOG_DEBIAN_MIRROR:-$mirror}
    [[ -n "$mirror" ]] || die "no Debian $SUITE mirror in /etc/apt/sources.list*; set RANKLOG_DEBIAN_MIRROR"

    local rootfs
    mkdir -p "$HERE/.build" "$CACHE"
    rootfs=$(mktemp -d "$HERE/.build/rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$rootfs'" EXIT

    say "debootstrap $SUITE (minbase + python3, python3-venv) from $mirror"
    local started=$SECONDS
    timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --cache-dir="$CACHE" "$SUITE" "$rootfs" "$mirror" >"$HERE/.build/debootstrap.log" 2>&1 \
        || { tail -n 30 "$HERE/.build/debootstrap.log" >&2; die "debootstrap failed (log: $HERE/.build/debootstrap.log)"; }
    say "debootstrap done in $((SECONDS - started))s"

    # What an image needs no copy of: package lists, caches, docs, man pages.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/tmp/* "$rootfs"/var/log/*.log
    # The same Debian mirror inside the image, should anyone apt-get there.
    echo "deb $mirror $SUITE main" >"$rootfs/etc/apt/sources.list"

    say "docker import -> $IMAGE"
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "debootstrap $SUITE minbase + python3 from $mirror" \
        - "$IMAGE" >/dev/null
    say "$IMAGE ready ($(docker run --rm "$IMAGE" python3 --version)) in $((SECONDS - started))s"
}

main "$@"
