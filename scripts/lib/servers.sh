# shellcheck shell=bash
# shellcheck disable=SC2034 # FGA_WB_*_LOG/_PID and OPENFGA_BIN/REDIS_BIN are for callers
#
# scripts/lib/servers.sh: start throw-away OpenFGA and Redis servers for tests.
#
# Meant to be `source`d by scripts/test, scripts/servers, scripts/capture-fixtures
# (and later the benchmark and demo scripts). The caller runs with
# `set -euo pipefail` and installs the cleanup itself:
#
#     source "$repo/scripts/lib/servers.sh"
#     trap fga_wb_cleanup EXIT
#     trap 'fga_wb_on_signal INT' INT
#     trap 'fga_wb_on_signal TERM' TERM
#     trap 'fga_wb_on_signal HUP' HUP
#
#     fga_wb_ensure_openfga; fga_wb_ensure_redis; fga_wb_ensure_postgres
#     fga_wb_start_servers openfga openfga-pg redis
#     fga_wb_run_child cargo test      # exports FGA_WB_TEST_* are visible to it
#
# Design notes (the "why"):
# - Every server (and every long child such as `go install` or `cargo test`) is started
#   in its own process group (bash `set -m` around the `&`). Cleanup then kills whole
#   groups, so nothing a server forks survives it, and a Ctrl-C in the terminal does not
#   race our cleanup: the script's trap decides the order (stop the child, then servers).
# - Long children run in the background and the script `wait`s for them, because bash
#   defers traps while a foreground child runs: `kill <script>` would otherwise do
#   nothing until `cargo test` finished.
# - A small watchdog process kills the servers (and the running child) if the script
#   itself dies without running its traps (kill -9, OOM killer), so a crashed run never
#   leaves servers behind.
# - Ports are random free loopback ports, so several runs (and the tests' own extra
#   servers) can coexist on one machine.

# Pinned OpenFGA version used when no suitable `openfga` is on PATH. The write-behind
# layer needs on_duplicate/on_missing on Write, available from 1.10.
FGA_WB_OPENFGA_VERSION="${FGA_WB_OPENFGA_VERSION:-v1.18.1}"

# How long a server may take to become ready before we give up (seconds).
FGA_WB_START_TIMEOUT="${FGA_WB_START_TIMEOUT:-60}"

# Global state of this run (all in the sourcing shell, never in subshells).
FGA_WB_TMP=""                       # the run's temp dir, created on demand (never
                                    # inherited: cleanup deletes it)
_FGA_WB_SERVER_PGIDS=()             # process groups of the servers we started
_FGA_WB_CHILD_PGID=""               # process group of the current fga_wb_run_child
_FGA_WB_WATCHDOG_PID=""
_FGA_WB_CLEANED=0
_FGA_WB_APT_UPDATED=0

fga_wb_log() { printf '[fga-wb] %s\n' "$*" >&2; }
fga_wb_die() { printf '[fga-wb] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Temp dir and process-group helpers
# ---------------------------------------------------------------------------

# Creates the run's temp dir (once). Must run in the main shell, not in $(...), so the
# variable sticks; the start functions call it themselves.
fga_wb_tmpdir() {
    if [[ -z "$FGA_WB_TMP" || ! -d "$FGA_WB_TMP" ]]; then
        FGA_WB_TMP="$(mktemp -d "${TMPDIR:-/tmp}/fga-wb.XXXXXX")"
        : >"$FGA_WB_TMP/ports"
        : >"$FGA_WB_TMP/pgids"
    fi
}

# Starts "$@" in the background in a new process group; stdout+stderr go to $log.
# Sets _FGA_WB_LAST_PID (== its pgid). stdin is /dev/null: servers must never read
# the developer's terminal.
_fga_wb_spawn() {
    local log="$1"; shift
    set -m
    "$@" >"$log" 2>&1 </dev/null &
    _FGA_WB_LAST_PID=$!
    set +m
}

# Kills a process group: TERM first, KILL after ~5 s if anything is left.
_fga_wb_kill_group() {
    local pgid="$1" i
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
}

# The watchdog: a background loop that outlives us only if we die without cleanup
# (kill -9, OOM killer, a kill of our whole process group). It runs in its own process
# group and ignores INT/TERM/HUP, so only our cleanup (KILL) or our death ends it. It
# polls our pid; once we are gone it kills the running child's process group (file
# "child") and the servers' (file "pgids"), and removes the temp dir.
_fga_wb_start_watchdog() {
    [[ -n "$_FGA_WB_WATCHDOG_PID" ]] && return 0
    local parent=$$ tmp="$FGA_WB_TMP" keep="${FGA_WB_KEEP_TMP:-0}"
    set -m
    (
        trap '' INT TERM HUP
        exec </dev/null >/dev/null 2>&1
        while kill -0 "$parent" 2>/dev/null; do sleep 1; done
        while read -r pgid; do
            [[ -n "$pgid" ]] && kill -KILL -- "-$pgid" 2>/dev/null
        done < <(cat "$tmp/child" "$tmp/pgids" 2>/dev/null)
        [[ "$keep" == 1 ]] || rm -rf "$tmp"
    ) &
    _FGA_WB_WATCHDOG_PID=$!
    set +m
}

_fga_wb_register_server() {
    _FGA_WB_SERVER_PGIDS+=("$1")
    echo "$1" >>"$FGA_WB_TMP/pgids"
    _fga_wb_start_watchdog
}

# Runs "$@" in its own process group and waits for it; returns its exit status.
# Waiting with `wait` (not as a foreground child) lets our INT/TERM traps run at once;
# fga_wb_cleanup then stops the child's whole group (cargo and its test binaries).
# The child keeps our stdout/stderr/stdin; being outside the terminal's foreground
# process group it must not read from the terminal (cargo test, benchmarks don't).
fga_wb_run_child() {
    local rc=0
    fga_wb_tmpdir
    _fga_wb_start_watchdog
    set -m
    "$@" &
    _FGA_WB_CHILD_PGID=$!
    set +m
    echo "$_FGA_WB_CHILD_PGID" >"$FGA_WB_TMP/child" # for the watchdog
    wait "$_FGA_WB_CHILD_PGID" || rc=$?
    : >"$FGA_WB_TMP/child"
    _FGA_WB_CHILD_PGID=""
    return "$rc"
}

# Stops everything this run started. Idempotent: it runs from the signal trap and
# again from the EXIT trap.
fga_wb_cleanup() {
    local rc=$?
    [[ "$_FGA_WB_CLEANED" == 1 ]] && return "$rc"
    _FGA_WB_CLEANED=1
    if [[ -n "$_FGA_WB_CHILD_PGID" ]]; then
        _fga_wb_kill_group "$_FGA_WB_CHILD_PGID"
    fi
    if [[ -n "$_FGA_WB_WATCHDOG_PID" ]]; then
        kill -KILL "$_FGA_WB_WATCHDOG_PID" 2>/dev/null || true
        wait "$_FGA_WB_WATCHDOG_PID" 2>/dev/null || true
    fi
    local pgid
    for pgid in "${_FGA_WB_SERVER_PGIDS[@]}"; do
        _fga_wb_kill_group "$pgid"
    done
    if [[ -n "$FGA_WB_TMP" && -d "$FGA_WB_TMP" ]]; then
        if [[ "${FGA_WB_KEEP_TMP:-0}" == 1 ]]; then
            fga_wb_log "kept temp dir (logs): $FGA_WB_TMP"
        else
            rm -rf "$FGA_WB_TMP"
        fi
    fi
    return "$rc"
}

# Signal trap: clean up, then exit with the conventional 128+signal status.
fga_wb_on_signal() {
    local sig="$1" code=1
    case "$sig" in
        HUP) code=129 ;; INT) code=130 ;; TERM) code=143 ;;
    esac
    fga_wb_log "caught SIG$sig, stopping servers"
    fga_wb_cleanup || true
    exit "$code"
}

# ---------------------------------------------------------------------------
# Installing prerequisites
# ---------------------------------------------------------------------------

# apt-get install, as root or through sudo. `apt-get update` runs once per run.
# A fresh VM's unattended upgrades may hold apt's locks at boot: wait for them.
_fga_wb_apt_install() {
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            fga_wb_die "need to install $* but not root and sudo is missing; install it by hand"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fga_wb_die "need to install $* but apt-get is missing; install it by hand"
    fga_wb_log "installing $* with apt-get"
    if [[ "$_FGA_WB_APT_UPDATED" != 1 ]]; then
        # dpkg's lock timeout does not cover the lists' lock that `update`
        # takes: tried again instead, for about three minutes.
        local try
        for try in 1 2 3 4 5 6 7 8 9 10; do
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 && break
            ((try < 10)) || fga_wb_die "apt-get update failed 10 times; see above"
            fga_wb_log "apt-get update failed (try $try of 10; another apt may hold its lock); again in 20 s"
            sleep 20
        done
        _FGA_WB_APT_UPDATED=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q "$@" >&2
}

fga_wb_ensure_curl() {
    command -v curl >/dev/null 2>&1 || _fga_wb_apt_install curl ca-certificates
    command -v curl >/dev/null 2>&1 || fga_wb_die "curl still missing after install"
}

# Prints the x.y.z version reported by `$1 version` (empty if none found).
_fga_wb_openfga_version_of() {
    "$1" version 2>&1 | grep -oE 'version[^0-9]*[0-9]+\.[0-9]+\.[0-9]+' |
        grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true
}

# Sets OPENFGA_BIN (and FGA_WB_OPENFGA_BIN_VERSION): `openfga` from PATH if it is
# the pinned version, else the cached pinned build (built with `go install` on
# first use; 10+ minutes on a small machine). Only the pinned version: the tests
# take OpenFGA's answers as their oracle, and other versions answer differently.
fga_wb_ensure_openfga() {
    local path_bin version
    if path_bin="$(command -v openfga 2>/dev/null)"; then
        version="$(_fga_wb_openfga_version_of "$path_bin")"
        if [[ "v$version" == "$FGA_WB_OPENFGA_VERSION" ]]; then
            OPENFGA_BIN="$path_bin"
            FGA_WB_OPENFGA_BIN_VERSION="v$version"
            fga_wb_log "using $OPENFGA_BIN (version $version)"
            return 0
        fi
        fga_wb_log "ignoring $path_bin: its version (${version:-unknown}) is not $FGA_WB_OPENFGA_VERSION (a go-install build says dev)"
    fi

    local dir="${FGA_WB_CACHE:-${HOME:?set HOME or FGA_WB_CACHE (where the OpenFGA build is kept)}/.cache/fga-wb}/openfga-$FGA_WB_OPENFGA_VERSION"
    OPENFGA_BIN="$dir/openfga"
    FGA_WB_OPENFGA_BIN_VERSION="$FGA_WB_OPENFGA_VERSION"
    mkdir -p "$dir"

    local target="github.com/openfga/openfga/cmd/openfga@$FGA_WB_OPENFGA_VERSION"

    if [[ ! -x "$OPENFGA_BIN" ]]; then
        local go_bin
        go_bin="$(command -v go 2>/dev/null || true)"
        [[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
        [[ -n "$go_bin" ]] || fga_wb_die "no openfga $FGA_WB_OPENFGA_VERSION on PATH and no 'go' to build $FGA_WB_OPENFGA_VERSION; install Go (https://go.dev/dl/) or put an openfga binary on PATH"
        # flock serialises concurrent runs of these scripts on the same cache dir
        # (the one that waited finds the binary built and exits at once).
        fga_wb_log "building openfga $FGA_WB_OPENFGA_VERSION into $dir (this takes a while; log: $dir/build.log)"
        local rc=0
        local lock=()
        command -v flock >/dev/null 2>&1 && lock=(flock "$dir/.build.lock")
        # Built into a scratch dir and moved into place once it runs: a build
        # cut short never leaves a half-written binary that later runs trust.
        # The caller's GOFLAGS and workspace do not change what is built.
        # Under CI the build's Go caches (about 2 GB: modules and compiled
        # packages) go to a scratch dir removed afterwards, success or not: a
        # CI machine builds once, and its disk is needed by the Rust tests.
        local go_caches=()
        [[ "${CI:-}" == true ]] &&
            go_caches=(GOCACHE="$dir/.gocache/build" GOMODCACHE="$dir/.gocache/mod" GOFLAGS=-modcacherw)
        # shellcheck disable=SC2016 # $1.. expand in the inner bash, on purpose
        fga_wb_run_child "${lock[@]}" bash -c '
            [[ -x "$1/openfga" ]] && exit 0
            rm -rf "$1/.building" && mkdir -p "$1/.building" || exit 1
            rc=0
            env -u GOFLAGS GOWORK=off GOTOOLCHAIN=local GOBIN="$1/.building" "${@:4}" \
                "$2" install "$3" >"$1/build.log" 2>&1 &&
                "$1/.building/openfga" version >>"$1/build.log" 2>&1 &&
                mv "$1/.building/openfga" "$1/openfga" || rc=$?
            rm -rf "$1/.gocache"
            exit "$rc"
        ' _ "$dir" "$go_bin" "$target" "${go_caches[@]}" || rc=$?
        if ((rc != 0)) || [[ ! -x "$OPENFGA_BIN" ]]; then
            tail -n 30 "$dir/build.log" >&2 || true
            fga_wb_die "building openfga $FGA_WB_OPENFGA_VERSION failed (rc=$rc); see $dir/build.log"
        fi
    fi
    # A `go install` build reports its version as "dev", so name the pinned one.
    fga_wb_log "using $OPENFGA_BIN (openfga $FGA_WB_OPENFGA_VERSION, built with go install)"
}

# The TLS test makes its certificates with the openssl command.
fga_wb_ensure_openssl() {
    command -v openssl >/dev/null 2>&1 || _fga_wb_apt_install openssl
}

# Sets REDIS_BIN: `redis-server` from PATH, else installs Debian's redis-server.
# The package's postinst may start a system redis on 6379; we leave it alone and
# never talk to it (our servers use random ports and their own data dirs).
fga_wb_ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        _fga_wb_apt_install redis-server
    fi
    # redis-cli builds the test cluster (Debian: redis-tools).
    command -v redis-cli >/dev/null 2>&1 || _fga_wb_apt_install redis-tools
    REDIS_BIN="$(command -v redis-server 2>/dev/null || true)"
    [[ -n "$REDIS_BIN" ]] || fga_wb_die "redis-server still missing after install"
    # fga-wb needs Redis 7 (sharded pub/sub; the test cluster's ADDSLOTSRANGE):
    # say so now rather than through failing tests.
    local version major
    version="$("$REDIS_BIN" --version | grep -oE 'v=[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true)"
    major="${version#v=}"
    major="${major%%.*}"
    [[ "$major" =~ ^[0-9]+$ ]] && ((major >= 7)) ||
        fga_wb_die "$REDIS_BIN is Redis ${version#v=}${version:+, }not 7.0 or later, which fga-wb needs; put a redis-server 7+ on PATH (e.g. from Debian 12 / Ubuntu 24.04 or redis.io's packages)"
}

# Installs Debian's PostgreSQL server if there is no initdb (Debian keeps it in
# /usr/lib/postgresql/<version>/bin, off PATH). The package's postinst may start a
# system cluster on 5432; we leave it alone and start our own on a random port.
fga_wb_ensure_postgres() {
    if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null 2>&1; then
        _fga_wb_apt_install postgresql
    fi
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 ||
        fga_wb_die "PostgreSQL's initdb still missing after install"
}

# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

# The cargo to use: on PATH, or rustup's default place (non-login shells, CI and
# cron often lack ~/.cargo/bin on PATH).
fga_wb_cargo() {
    if command -v cargo >/dev/null 2>&1; then
        echo cargo
    elif [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        echo "$HOME/.cargo/bin/cargo"
    else
        fga_wb_die "cargo not found on PATH nor in ~/.cargo/bin; install Rust (https://rustup.rs)"
    fi
}

# Where cargo puts what it builds for the repository, as cargo itself says
# (CARGO_TARGET_DIR, CARGO_BUILD_TARGET_DIR or build.target-dir in a config).
fga_wb_target_dir() {
    local repo dir
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    dir="$(cd "$repo" && "$(fga_wb_cargo)" metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    [[ -n "$dir" ]] || fga_wb_die "cargo metadata did not say where cargo builds to"
    echo "$dir"
}

# Starts servers with the project's one launcher, the `testenv` binary
# (testenv/src/bin/testenv.rs: openfga, openfga-pg, redis, redis-cluster), and
# exports what it prints (FGA_WB_TEST_*). It runs until our cleanup stops it, and
# dies with this shell if we are killed (PR_SET_PDEATHSIG).
fga_wb_start_servers() {
    fga_wb_tmpdir
    local cargo repo
    cargo="$(fga_wb_cargo)"
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    fga_wb_log "building the server launcher (cargo build -p fga-wb-testenv)"
    (cd "$repo" && "$cargo" build --quiet -p fga-wb-testenv) >&2 ||
        fga_wb_die "building testenv failed"
    local bin
    bin="$(fga_wb_target_dir)/debug/testenv"
    local out="$FGA_WB_TMP/servers.env" log="$FGA_WB_TMP/testenv.log"
    : >"$out"
    [[ -n "${OPENFGA_BIN:-}" ]] && export FGA_WB_TEST_OPENFGA_BIN="$OPENFGA_BIN"
    [[ -n "${REDIS_BIN:-}" ]] && export FGA_WB_TEST_REDIS_BIN="$REDIS_BIN"
    _fga_wb_spawn "$log" "$bin" up "$@"
    # _fga_wb_spawn sends stdout to the log; the launcher writes its exports there.
    FGA_WB_SERVERS_PID="$_FGA_WB_LAST_PID"
    _fga_wb_register_server "$FGA_WB_SERVERS_PID"
    local deadline=$((SECONDS + FGA_WB_START_TIMEOUT * 3))
    while ! grep -q '^# ready' "$log" 2>/dev/null; do
        if ! kill -0 "$FGA_WB_SERVERS_PID" 2>/dev/null; then
            tail -n 40 "$log" >&2 || true
            fga_wb_die "starting servers ($*) failed (log above: $log)"
        fi
        ((SECONDS < deadline)) || fga_wb_die "servers ($*) not ready after $((FGA_WB_START_TIMEOUT * 3))s; see $log"
        sleep 0.1
    done
    grep '^export ' "$log" >"$out"
    # shellcheck disable=SC1090 # written just above by the launcher
    source "$out"
}

# Prints the env of the running servers as `export` lines (for eval / copy-paste).
fga_wb_print_env() {
    local name
    for name in FGA_WB_TEST_OPENFGA_URL FGA_WB_TEST_OPENFGA_TOKEN FGA_WB_TEST_OPENFGA_BIN \
        FGA_WB_TEST_OPENFGA_PG_URL FGA_WB_TEST_OPENFGA_PG_TOKEN FGA_WB_TEST_POSTGRES_PORT \
        FGA_WB_TEST_REDIS_URL FGA_WB_TEST_REDIS_BIN FGA_WB_TEST_REDIS_CLUSTER_URL; do
        [[ -n "${!name:-}" ]] && printf 'export %s=%q\n' "$name" "${!name}"
    done
    return 0
}
