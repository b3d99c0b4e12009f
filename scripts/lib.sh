# shellcheck shell=bash
# Shared helpers for the scripts in this directory: paths, dependency
# installation (idempotent), building, and the QEMU command line.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=aarch64-unknown-none
# CARGO_TARGET_DIR is honoured, so parallel work can build and boot from
# separate trees.
OUT="${CARGO_TARGET_DIR:-$ROOT/target}/$TARGET/release"
HYP_ELF="$OUT/hypervisor"
GUEST_ELF="$OUT/guest"
GUEST_BIN="$OUT/guest.bin"
# Host physical address where QEMU's generic loader puts the guest image.
# Inside RAM for every supported size (>= 256 MiB), above the hypervisor image.
GUEST_LOAD_ADDR=0x48000000

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs a Debian package if the command it provides is missing.
need_pkg() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    if [ "$(id -u)" != 0 ]; then die "$1 is missing and we are not root: apt-get install $2"; fi
    if [ -z "${APT_UPDATED:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2
}

# Everything needed to build and boot: the Rust target (and llvm-tools for
# objcopy) via rustup, QEMU via apt.
ensure_build_deps() {
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup"
    cd "$ROOT"
    if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        log "adding Rust target $TARGET"
        rustup target add "$TARGET" >&2
    fi
    if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
        log "adding rustup component llvm-tools"
        rustup component add llvm-tools >&2
    fi
    need_pkg qemu-system-aarch64 qemu-system-arm
}

objcopy_bin() {
    local sysroot
    sysroot="$(rustc --print sysroot)"
    local tool
    tool="$(find "$sysroot/lib/rustlib" -name llvm-objcopy -type f | head -n1)"
    [ -x "$tool" ] || die "llvm-objcopy not found (rustup component add llvm-tools)"
    echo "$tool"
}

# Builds the hypervisor and the guest (release, with debug info) and the
# guest's raw image.
build_all() {
    cd "$ROOT"
    log "building hypervisor and guest"
    cargo build --release --target "$TARGET" -p hypervisor -p guest >&2
    "$(objcopy_bin)" -O binary "$GUEST_ELF" "$GUEST_BIN"
}

# The hypervisor built with cargo features FEATURES (comma list, e.g.
# tlb-check or broken-skip-flush), in a target tree of its own.
hyp_variant_elf() { # features
    echo "${CARGO_TARGET_DIR:-$ROOT/target}/hyp-${1//,/-}/$TARGET/release/hypervisor"
}
build_hyp_variant() { # features
    cd "$ROOT"
    log "building the hypervisor with features $1"
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/hyp-${1//,/-}" \
        cargo build --release --target "$TARGET" -p hypervisor --features "$1" >&2
}

# Prints the QEMU command for: cpu smp mem append guest(yes|no) [extra...]
qemu_cmd() {
    local cpu="$1" smp="$2" mem="$3" append="$4" guest="$5"
    shift 5
    local args=(qemu-system-aarch64 -M virt,virtualization=on -cpu "$cpu" -smp "$smp" -m "$mem"
        -nographic -nic none -semihosting-config enable=on,target=native
        -kernel "$HYP_ELF")
    if [ "$guest" = yes ]; then
        local size
        size=$(stat -c %s "$GUEST_BIN")
        append="guest=$GUEST_LOAD_ADDR+$(printf '0x%x' "$size") $append"
        args+=(-device "loader,file=$GUEST_BIN,addr=$GUEST_LOAD_ADDR,force-raw=on")
    fi
    args+=(-append "$append" "$@")
    printf '%q ' "${args[@]}"
}
