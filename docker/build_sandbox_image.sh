#!/usr/bin/env bash
# Build the sandbox image: a Python standard library plus sandbox/runner.py, nothing else.
#
#   bash docker/build_sandbox_image.sh [--online | --offline] [--force]
#
#   --online   build FROM the registry image python:3.11-slim-bookworm (pulled when absent)
#   --offline  build FROM a base image made here with debootstrap: no registry needed, only
#              a Debian mirror (root required, ~1 minute the first time)
#   neither    use a base image that is already present, else pull the registry one, else
#              build the offline one
#   --force    rebuild even when the image is up to date
#
# Idempotent: an image whose label carries the hash of the Dockerfile and the runner is left
# alone, and the script returns at once. Starts a Docker engine first (docker/start_engine.sh)
# when none answers.
#
# Environment (all optional):
#   QROBUST_SANDBOX_IMAGE          image to build          (default qrobust-sandbox:latest)
#   QROBUST_SANDBOX_REGISTRY_BASE  registry base image     (default python:3.11-slim-bookworm)
#   QROBUST_SANDBOX_OFFLINE_BASE   offline base image name (default qrobust-sandbox-base:bookworm)
#   QROBUST_DEBIAN_MIRROR          mirror for debootstrap  (default http://deb.debian.org/debian)
#   QROBUST_DEBIAN_SUITE           Debian suite            (default bookworm)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
image="${QROBUST_SANDBOX_IMAGE:-qrobust-sandbox:latest}"
registry_base="${QROBUST_SANDBOX_REGISTRY_BASE:-python:3.11-slim-bookworm}"
offline_base="${QROBUST_SANDBOX_OFFLINE_BASE:-qrobust-sandbox-base:bookworm}"
mirror="${QROBUST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite="${QROBUST_DEBIAN_SUITE:-bookworm}"
dockerfile="$here/sandbox/Dockerfile"
runner="$repo/sandbox/runner.py"

mode=auto
force=0
for arg in "$@"; do
    case "$arg" in
        --online) mode=online ;;
        --offline) mode=offline ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build_sandbox_image: unknown argument '$arg' (allowed: --online, --offline, --force)" >&2; exit 2 ;;
    esac
done

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }
sha256_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

build_offline_base() {
    command -v debootstrap >/dev/null || { echo "build_sandbox_image: debootstrap not installed (apt-get install -y debootstrap)" >&2; exit 1; }
    [[ "$(id -u)" == 0 ]] || { echo "build_sandbox_image: --offline needs root (debootstrap)" >&2; exit 1; }
    local rootfs
    rootfs="$(mktemp -d /var/tmp/qrobust-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap $suite into $rootfs (python3 and its full standard library) ..."
    # python3, not python3-minimal: the minimal package lacks json, unittest, decimal ...
    debootstrap --variant=minbase --include=python3 "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { echo "build_sandbox_image: debootstrap failed; last lines of $rootfs.log:" >&2; tail -n 20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/info
    tar --numeric-owner -C "$rootfs" -c . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$offline_base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "built offline base image $offline_base"
}

choose_base() {
    case "$mode" in
        online)
            image_exists "$registry_base" || docker pull "$registry_base" >&2
            echo "$registry_base" ;;
        offline)
            image_exists "$offline_base" || build_offline_base >&2
            echo "$offline_base" ;;
        auto)
            if image_exists "$registry_base"; then echo "$registry_base"
            elif image_exists "$offline_base"; then echo "$offline_base"
            elif timeout 120 docker pull "$registry_base" >/dev/null 2>&1; then echo "$registry_base"
            else
                echo "no image registry reachable; building the base image offline" >&2
                build_offline_base >&2
                echo "$offline_base"
            fi ;;
    esac
}

bash "$here/start_engine.sh" >/dev/null

recipe_sha="$(sha256_of "$dockerfile" "$runner")"
runner_sha="$(sha256_of "$runner")"
if ((!force)) && image_exists "$image" && [[ "$(image_label "$image" org.qrobust.sandbox.recipe-sha256)" == "$recipe_sha" ]]; then
    echo "$image is up to date (base $(image_label "$image" org.qrobust.sandbox.base))"
    exit 0
fi

base="$(choose_base)"
previous_id="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$dockerfile" "$context/Dockerfile"
cp "$runner" "$context/runner.py"
# The classic builder needs no buildx plugin; its output is shown only when the build fails.
if ! build_log="$(DOCKER_BUILDKIT=0 docker build \
        --build-arg "BASE_IMAGE=$base" \
        --label "org.qrobust.sandbox.recipe-sha256=$recipe_sha" \
        --label "org.qrobust.sandbox.runner-sha256=$runner_sha" \
        --label "org.qrobust.sandbox.base=$base" \
        --tag "$image" "$context" 2>&1)"; then
    echo "$build_log" >&2
    echo "build_sandbox_image: docker build failed" >&2
    exit 1
fi
# Drop the image this build replaced, so rebuilds do not pile up untagged images.
current_id="$(docker image inspect --format '{{.Id}}' "$image")"
if [[ -n "$previous_id" && "$previous_id" != "$current_id" ]]; then
    docker image rm "$previous_id" >/dev/null 2>&1 || true
fi
echo "built $image from $base"
