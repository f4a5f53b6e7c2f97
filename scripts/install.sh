#!/usr/bin/env bash
# Install (or uninstall) caas-agent and caasctl plus the systemd unit.
#
# Run as root from the repository root:
#
#   scripts/install.sh               build, install, enable and start
#   scripts/install.sh --no-build    install already built target/release binaries
#   scripts/install.sh --uninstall   stop, disable, remove binaries and unit
#
# Environment:
#   PREFIX   install prefix for the binaries (default /usr/local)
set -euo pipefail

PREFIX=${PREFIX:-/usr/local}
BIN_DIR="$PREFIX/bin"
UNIT_NAME=caas-agent.service
UNIT_DST=/etc/systemd/system/$UNIT_NAME
WANTS_LINK=/etc/systemd/system/multi-user.target.wants/$UNIT_NAME
CONF_DIR=/etc/caas-agent
CONF_FILE=$CONF_DIR/config.toml
STATE_DIR=/var/lib/caas-agent
RUN_DIR=/run/caas-agent
BINARIES=(caas-agent caasctl)

log() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<'EOF'
Usage: scripts/install.sh [--no-build | --uninstall]

  (no option)   cargo build --release --bins --locked, then install
  --no-build    install the binaries already in target/release
  --uninstall   stop and disable the service, remove binaries and unit
                (keeps /etc/caas-agent and /var/lib/caas-agent)
  -h, --help    show this help

Binaries go to $PREFIX/bin (PREFIX defaults to /usr/local).
EOF
}

systemd_running() { [ -d /run/systemd/system ]; }

build=1
mode=install
for arg in "$@"; do
    case $arg in
    --no-build) build=0 ;;
    --uninstall) mode=uninstall ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $arg"
        ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must be run as root"

do_uninstall() {
    if systemd_running; then
        log "Stopping and disabling $UNIT_NAME"
        if systemctl list-unit-files --no-legend "$UNIT_NAME" 2>/dev/null | grep -q .; then
            systemctl disable --now "$UNIT_NAME" || info "(disable/stop reported an error, continuing)"
        else
            info "$UNIT_NAME is not known to systemd, nothing to stop"
        fi
    else
        log "systemd is not running (PID 1 is not systemd); not stopping anything"
        info "stop a hand-started agent yourself (send it SIGTERM)"
        if [ -L "$WANTS_LINK" ]; then
            rm -f -- "$WANTS_LINK"
            info "removed $WANTS_LINK"
        fi
    fi

    log "Removing binaries from $BIN_DIR"
    for b in "${BINARIES[@]}"; do
        if [ -e "$BIN_DIR/$b" ]; then
            rm -f -- "$BIN_DIR/$b"
            info "removed $BIN_DIR/$b"
        else
            info "$BIN_DIR/$b not present"
        fi
    done

    log "Removing unit $UNIT_DST"
    if [ -e "$UNIT_DST" ]; then
        rm -f -- "$UNIT_DST"
        info "removed $UNIT_DST"
    else
        info "$UNIT_DST not present"
    fi

    if systemd_running; then
        log "Reloading systemd"
        systemctl daemon-reload
        systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
    fi

    log "Uninstalled caas-agent"
    info "kept configuration: $CONF_DIR"
    info "kept state:         $STATE_DIR"
    info "delete them by hand if they are no longer needed"
    info "note: KillMode=process leaves tenant engine processes running after the"
    info "agent stops; their sockets in $RUN_DIR are kept as well"
}

write_example_config() {
    # Mode 0644: the file names TLS key paths but holds no secrets itself.
    (
        umask 022
        install -m 0644 scripts/config.example.toml "$CONF_FILE"
    )
}

do_install() {
    if [ ! -f Cargo.toml ] || [ ! -f "scripts/$UNIT_NAME" ]; then
        die "run this script from the repository root (Cargo.toml and scripts/$UNIT_NAME not found in $(pwd))"
    fi

    if [ "$build" -eq 1 ]; then
        command -v cargo >/dev/null 2>&1 ||
            die "cargo not found in PATH; build as your user with 'cargo build --release --bins --locked' and rerun with --no-build"
        log "Building release binaries (cargo build --release --bins --locked)"
        cargo build --release --bins --locked
    else
        log "Skipping build (--no-build)"
    fi

    for b in "${BINARIES[@]}"; do
        [ -x "target/release/$b" ] || die "target/release/$b not found; build first or drop --no-build"
    done

    log "Installing binaries to $BIN_DIR"
    install -d -m 0755 "$BIN_DIR"
    for b in "${BINARIES[@]}"; do
        install -m 0755 "target/release/$b" "$BIN_DIR/$b"
        info "$BIN_DIR/$b"
    done

    log "Installing unit to $UNIT_DST"
    install -d -m 0755 /etc/systemd/system
    if [ "$BIN_DIR" = /usr/local/bin ]; then
        install -m 0644 "scripts/$UNIT_NAME" "$UNIT_DST"
    else
        # The unit refers to /usr/local/bin; point it at the chosen PREFIX.
        tmp_unit=$(mktemp)
        sed "s|/usr/local/bin/caas-agent|$BIN_DIR/caas-agent|g" "scripts/$UNIT_NAME" >"$tmp_unit"
        install -m 0644 "$tmp_unit" "$UNIT_DST"
        rm -f -- "$tmp_unit"
        info "ExecStart rewritten to use $BIN_DIR/caas-agent"
    fi

    log "Preparing configuration directory $CONF_DIR"
    install -d -m 0755 "$CONF_DIR"
    if [ -e "$CONF_FILE" ]; then
        info "$CONF_FILE already exists, leaving it unchanged"
    else
        write_example_config
        info "wrote example $CONF_FILE (everything commented out)"
    fi

    if systemd_running; then
        was_active=0
        systemctl is-active --quiet "$UNIT_NAME" && was_active=1
        log "Reloading systemd"
        systemctl daemon-reload
        log "Enabling and starting $UNIT_NAME"
        systemctl enable --now "$UNIT_NAME"
        if [ "$was_active" -eq 1 ]; then
            info "the agent was already running and still runs the old binary;"
            info "restart it to pick up the new one (tenant engines keep running):"
            info "  systemctl restart caas-agent"
        fi
        info "status: systemctl status caas-agent"
        info "logs:   journalctl -u caas-agent -f"
    else
        log "systemd is not running (PID 1 is not systemd): unit installed but not enabled or started"
        info "start the agent by hand, e.g.:"
        info "  install -d -m 0755 $RUN_DIR $STATE_DIR"
        info "  $BIN_DIR/caas-agent serve --config $CONF_FILE"
        info "on a host booted with systemd, enable it with:"
        info "  systemctl daemon-reload && systemctl enable --now caas-agent"
    fi

    log "Done"
}

case $mode in
install) do_install ;;
uninstall) do_uninstall ;;
esac
