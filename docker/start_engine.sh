#!/usr/bin/env bash
# Make a Docker engine reachable for the sandbox: a no-op when one already answers,
# otherwise start dockerd on a private data root and wait until it answers.
#
#   bash docker/start_engine.sh
#
# Environment (all optional):
#   QROBUST_DOCKER_DATA_ROOT      engine state directory   (default /var/lib/qrobust-docker)
#   QROBUST_DOCKER_START_TIMEOUT  seconds to wait          (default 60)
# Needs root and dockerd (Debian: apt-get install -y docker.io).
set -euo pipefail

data_root="${QROBUST_DOCKER_DATA_ROOT:-/var/lib/qrobust-docker}"
timeout_s="${QROBUST_DOCKER_START_TIMEOUT:-60}"
log_file="${data_root}.log"
pid_file="${data_root}.pid"
lock_file="${data_root}.lock"

engine_answers() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

if engine_answers; then
    echo "docker engine already reachable ($(docker info --format '{{.ServerVersion}}'))"
    exit 0
fi
command -v docker >/dev/null || { echo "start_engine: docker client not installed (apt-get install -y docker.io)" >&2; exit 1; }
command -v dockerd >/dev/null || { echo "start_engine: dockerd not installed (apt-get install -y docker.io)" >&2; exit 1; }
if [[ -n "${DOCKER_HOST:-}" ]]; then
    echo "start_engine: DOCKER_HOST=${DOCKER_HOST} does not answer; not starting a local engine in its place" >&2
    exit 1
fi

mkdir -p "$data_root"
# Two callers at once (CI steps, parallel test sessions) must not start two engines.
exec 9>"$lock_file"
flock 9
if ! engine_answers; then
    engine_pid="$(cat "$pid_file" 2>/dev/null || true)"
    if [[ -z "$engine_pid" ]] || ! kill -0 "$engine_pid" 2>/dev/null; then
        rm -f "$pid_file"
        # setsid: the engine must outlive this shell and the CI step that ran it.
        setsid dockerd --data-root "$data_root" --pidfile "$pid_file" </dev/null >>"$log_file" 2>&1 &
        echo "starting dockerd (data root $data_root, log $log_file)"
    fi
    deadline=$((SECONDS + timeout_s))
    until engine_answers; do
        if ((SECONDS >= deadline)); then
            echo "start_engine: dockerd did not answer within ${timeout_s}s; last log lines:" >&2
            tail -n 20 "$log_file" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
fi
echo "docker engine ready ($(docker info --format '{{.ServerVersion}}'))"
