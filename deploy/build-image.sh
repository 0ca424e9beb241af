#!/usr/bin/env bash
# Build the onecard image from deploy/Dockerfile, then run it as the cluster runs it (read-only
# root filesystem, its own non-root user) and check it: docs/operators.md "Building the image".
#
#   deploy/build-image.sh                    # podman, else buildah, else docker; base python:3.11-slim
#   deploy/build-image.sh --local-base       # base made here from Debian packages (no registry image)
#   deploy/build-image.sh --tag onecard:1.2 --base registry.example/python:3.11-slim --no-check
#
# Options:
#   --tag TAG          the image's tag (default localhost/onecard:dev)
#   --base IMAGE       the base image (BASE_IMAGE build argument; default python:3.11-slim). When it
#                      cannot be pulled, the script says so and makes the local base instead.
#   --local-base       make the base image here with debootstrap from Debian bookworm's packages
#                      (CPython 3.11, as the wheels in requirements.lock need), tagged
#                      localhost/onecard-base:bookworm; made once, reused after (--rebuild-base)
#   --ca-bundle FILE   a CA bundle for pip inside the build, where the way to the package index
#                      passes a TLS-inspecting proxy (default: $PIP_CERT when that names a file).
#                      A build secret: it is in no layer of the image.
#   --engine NAME      podman, buildah or docker (default: the first one installed)
#   --no-check         build only; do not run the image
#
# Environment: ONECARD_DEBIAN_MIRROR (debootstrap's mirror; default: the first Debian source of
# this machine's apt), ONECARD_BASE_SUITE (default bookworm).
#
# The checks run tests/test_image.py's ONECARD_IMAGE tests (with .venv from `make gen`): the
# image's user and read-only root, every entry point, and the identity service from the image
# migrating and serving against a PostgreSQL and a NATS started on this machine. Without .venv
# only the first two are checked, here. It exits non-zero, saying why, on the first failure.
set -euo pipefail

cd "$(dirname "$0")/.."
TAG=localhost/onecard:dev
BASE=""
LOCAL_BASE=0
REBUILD_BASE=0
CA_BUNDLE="${PIP_CERT:-}"
ENGINE=""
CHECK=1
LOCAL_BASE_TAG=localhost/onecard-base:bookworm
SUITE="${ONECARD_BASE_SUITE:-bookworm}"
DEFAULT_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' deploy/Dockerfile)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
        --base) BASE="${2:?--base needs a value}"; shift 2 ;;
        --local-base) LOCAL_BASE=1; shift ;;
        --rebuild-base) LOCAL_BASE=1; REBUILD_BASE=1; shift ;;
        --ca-bundle) CA_BUNDLE="${2:?--ca-bundle needs a file}"; shift 2 ;;
        --engine) ENGINE="${2:?--engine needs a value}"; shift 2 ;;
        --no-check) CHECK=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

if [ -z "$ENGINE" ]; then
    for candidate in podman buildah docker; do
        if command -v "$candidate" >/dev/null; then ENGINE=$candidate; break; fi
    done
    [ -n "$ENGINE" ] || die "no podman, buildah or docker here (Debian: apt-get install podman)"
fi
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"
if [ "$ENGINE" = docker ] && ! docker info >/dev/null 2>&1; then
    die "docker answers but no Docker engine runs here; use podman or buildah (no daemon needed)"
fi

image_exists() {
    case "$ENGINE" in
        buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
        *) "$ENGINE" image inspect "$1" >/dev/null 2>&1 ;;
    esac
}

debian_mirror() {
    if [ -n "${ONECARD_DEBIAN_MIRROR:-}" ]; then echo "$ONECARD_DEBIAN_MIRROR"; return; fi
    # the first Debian archive this machine's apt uses (deb822 .sources or one-line lists)
    local found
    found=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {uri=$2} /^Suites:/ && uri ~ /debian\/?$/ {print uri; exit}')
    if [ -z "$found" ]; then
        found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}')
    fi
    [ -n "$found" ] || die "no Debian mirror in this machine's apt sources: set ONECARD_DEBIAN_MIRROR"
    echo "$found"
}

make_local_base() {
    if image_exists "$LOCAL_BASE_TAG" && [ "$REBUILD_BASE" = 0 ]; then
        say "base image $LOCAL_BASE_TAG is there already (--rebuild-base makes it anew)"
        return
    fi
    command -v debootstrap >/dev/null || die "--local-base needs debootstrap (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || die "--local-base runs debootstrap, which needs root"
    local mirror rootfs started
    mirror=$(debian_mirror)
    rootfs=$(mktemp -d /tmp/onecard-base.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    started=$SECONDS
    say "making the base image: debootstrap --variant=minbase $SUITE from the machine's Debian mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (its log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    "$rootfs/usr/bin/python3" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
        || chroot "$rootfs" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
        || die "the $SUITE base has no CPython 3.11 (the wheels in requirements.lock are for 3.11)"
    # what an image needs no copy of: package lists and caches, documentation
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    case "$ENGINE" in
        buildah)
            local container
            container=$(buildah from scratch)
            buildah copy --quiet "$container" "$rootfs" / >/dev/null
            buildah config --cmd /bin/bash "$container"
            buildah commit --quiet --rm "$container" "$LOCAL_BASE_TAG" >/dev/null ;;
        podman) tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE_TAG" >/dev/null ;;
        docker) tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE_TAG" >/dev/null ;;
    esac
    rm -rf "$rootfs"
    trap - EXIT
    say "base image $LOCAL_BASE_TAG made in $((SECONDS - started)) s"
}

if [ "$LOCAL_BASE" = 1 ]; then
    [ -z "$BASE" ] || die "--base and --local-base exclude each other"
    make_local_base
    BASE=$LOCAL_BASE_TAG
elif [ -z "$BASE" ]; then
    BASE=$DEFAULT_BASE
    if ! image_exists "$BASE"; then
        say "pulling $BASE"
        pull_log=$(mktemp)
        if ! "$ENGINE" pull "$BASE" >"$pull_log" 2>&1; then
            say "cannot pull $BASE: $(tail -1 "$pull_log")"
            say "making a base image from Debian packages instead (--local-base)"
            make_local_base
            BASE=$LOCAL_BASE_TAG
        fi
        rm -f "$pull_log"
    fi
fi

# Can this machine run a container? Some sandboxes cannot with the engine's defaults: podman's
# crun refuses a hybrid cgroup v1/v2 host, and raising the open-files and process limits a
# container gets needs a capability a sandbox may withhold. Then the build runs its steps with
# chroot isolation, and the checks run the image with runc and the limits this shell has.
BUILD_FLAGS=()
RUN_ENGINE="$ENGINE"
RUN_FLAGS=""
# shellcheck disable=SC2086 # the flags are words to split
can_run() { $1 run --rm --network host $2 "$BASE" true >/dev/null 2>&1; }
if [ "$ENGINE" = podman ]; then
    if ! can_run podman ""; then
        limits="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=4096:4096"
        if command -v runc >/dev/null && can_run "podman --runtime runc" "$limits"; then
            say "podman runs containers here only with runc and this shell's limits: using those"
            RUN_ENGINE="podman --runtime runc"
            RUN_FLAGS="$limits"
        else
            say "podman cannot run a container here (try apt-get install runc); building with chroot isolation"
            CHECK=0
        fi
        BUILD_FLAGS+=(--isolation chroot)
    fi
elif [ "$ENGINE" = buildah ]; then
    BUILD_FLAGS+=(--isolation "${BUILDAH_ISOLATION:-chroot}")
    [ "$CHECK" = 0 ] || say "buildah builds but does not run containers: no checks (install podman for them)"
    CHECK=0
fi
if [ -n "$CA_BUNDLE" ]; then
    [ -s "$CA_BUNDLE" ] || die "the CA bundle $CA_BUNDLE is not a file"
    BUILD_FLAGS+=(--secret "id=pip_ca,src=$CA_BUNDLE")
fi

say "building $TAG from deploy/Dockerfile with $ENGINE (base $BASE)"
started=$SECONDS
case "$ENGINE" in
    buildah) buildah build "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE" -f deploy/Dockerfile -t "$TAG" . ;;
    docker) DOCKER_BUILDKIT=1 docker build "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE" -f deploy/Dockerfile -t "$TAG" . ;;
    podman) podman build "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE" -f deploy/Dockerfile -t "$TAG" . ;;
esac || die "the build failed (above)"
if [ "$ENGINE" = buildah ]; then
    size=$(buildah images --noheading --format '{{.Size}}' "$TAG" 2>/dev/null | head -1)
else
    size="$(( $("$ENGINE" image inspect --format '{{.Size}}' "$TAG") / 1000000 )) MB"
fi
say "built $TAG in $((SECONDS - started)) s: $size"

if [ "$CHECK" = 0 ]; then exit 0; fi

say "checking $TAG: read-only root filesystem, its own user, every entry point"
export ONECARD_IMAGE="$TAG" ONECARD_IMAGE_ENGINE="$RUN_ENGINE" ONECARD_IMAGE_RUN_FLAGS="$RUN_FLAGS"
if [ -x .venv/bin/python ]; then
    basetemp=$(mktemp -d /tmp/onecard-image-check.XXXXXX)
    .venv/bin/python -m pytest -q -p no:cacheprovider --basetemp="$basetemp" tests/test_image.py \
        || die "the image fails its checks (above; the tests' files are in $basetemp)"
    rm -rf "$basetemp"
else
    say "no .venv (make gen): checking only the user, the read-only root and the help of each process"
    # shellcheck disable=SC2086 # the flags are words to split
    run() { $RUN_ENGINE run --rm --read-only --network host $RUN_FLAGS "$@"; }
    # shellcheck disable=SC2086
    [ "$ENGINE" != podman ] || run() { $RUN_ENGINE run --rm --read-only --read-only-tmpfs=false --network host $RUN_FLAGS "$@"; }
    uid=$(run --entrypoint id "$TAG" -u) || die "the image does not run"
    [ "$uid" != 0 ] || die "the image runs as root"
    if run --entrypoint sh "$TAG" -c 'touch /probe' 2>/dev/null; then die "the root filesystem is writable"; fi
    run --entrypoint onecard-admin "$TAG" --help >/dev/null || die "onecard-admin --help fails in the image"
    run --entrypoint python "$TAG" -c 'import gateway.app' || die "the gateway does not import in the image"
    run "$TAG" services.identity --help >/dev/null || die "services.identity --help fails in the image"
fi
say "$TAG runs as user $("$ENGINE" image inspect --format '{{.Config.User}}' "$TAG") on a read-only root: checked"
