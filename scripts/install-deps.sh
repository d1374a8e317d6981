#!/usr/bin/env bash
# Installs everything stasis needs on a fresh Debian bookworm machine. Idempotent.
# Why each package comes from where it does is in docs/host-requirements.md: bookworm's CRIU is
# too old for current kernels, so CRIU/runc/crun/runsc/checkpointctl come from trixie and
# containerd 2.x from sid, both added with a low pin so nothing else is upgraded by accident.
# Packages from the newer suites are installed without their Recommends: CRIU's would pull
# python3-pycriu and with it trixie's python3, replacing the machine's system Python.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Reuse the mirror URI of the machine's own Debian sources.
mirror=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
  [ -f "$f" ] || continue
  # Only live lines: a commented snapshot URI must not win.
  mirror=$(grep -Ev '^\s*#' "$f" | grep -Eo 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
  [ -n "$mirror" ] && break
done
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}

list=/etc/apt/sources.list.d/stasis-newer.sources
if [ ! -f "$list" ] || ! grep -q "URIs: $mirror$" "$list"; then
  cat >"$list" <<SRC
Types: deb
URIs: $mirror
Suites: trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >/etc/apt/preferences.d/stasis-newer <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=sid
Pin-Priority: 50
PIN
fi

need() { ! dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in criu runc crun runsc checkpointctl; do need "$p" && missing+=("$p"); done
base=()
for p in iptables busybox-static containernetworking-plugins protobuf-compiler iproute2 procps zstd docker-registry; do need "$p" && base+=("$p"); done
ctd_ok=1
if ! command -v containerd >/dev/null || ! containerd --version | grep -Eq ' v?2\.'; then ctd_ok=0; fi

if [ ${#missing[@]} -gt 0 ] || [ ${#base[@]} -gt 0 ] || [ $ctd_ok = 0 ]; then
  apt-get update -q
  [ ${#base[@]} -gt 0 ] && apt-get install -y -q "${base[@]}"
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends -t trixie "${missing[@]}"
    echo "install-deps: installed from trixie (no Recommends): ${missing[*]}"
  fi
  if [ $ctd_ok = 0 ]; then
    apt-get install -y -q --no-install-recommends -t sid containerd
    echo "install-deps: installed from sid (no Recommends): containerd"
  fi
  [ ${#base[@]} -gt 0 ] && echo "install-deps: installed from bookworm: ${base[*]}"
fi

# The Debian containerd package starts a system containerd; stasis never uses it (tests run a
# private one), so leave it alone but make sure it doesn't hold NRI's socket for our instances.
for b in containerd ctr runc criu iptables-restore busybox docker-registry; do
  command -v "$b" >/dev/null || { echo "install-deps: $b still missing after install" >&2; exit 1; }
done
command -v runsc >/dev/null || echo "install-deps: note: runsc not installed" >&2
criu --version | head -n1
runc --version | head -n1
containerd --version

# Post-copy migration: CRIU's page server grows a pipe to its largest page pipe (~3-4 MiB),
# past the kernel's 1 MiB default, which root may exceed only with CAP_SYS_RESOURCE (absent
# here); without this the first page request fails (docs/host-requirements.md).
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
  sysctl -q -w fs.pipe-max-size=4194304
  echo "install-deps: fs.pipe-max-size set to 4194304 (post-copy)"
fi

# CRIU probes the kernel for ~35 ms at every start unless it finds its cache, /run/criu.kdat.
# It writes that cache only where /run is a tmpfs (systemd hosts; here /run is on the root
# file system), and its failed attempt leaves /run/criu.kdat.tmp behind. Every dump, restore
# and lazy-pages daemon paid the probe. Let CRIU write its cache in a private mount namespace
# with a tmpfs /run, and keep it where every CRIU reads it (a fresh machine per boot, so it
# cannot outlive this kernel; CRIU itself drops a cache of another version).
if [ "$(stat -f -c %T /run)" != tmpfs ] && [ ! -s /run/criu.kdat ]; then
  rm -f /run/criu.kdat.tmp
  (umask 077 && unshare -m sh -c \
    'mount -t tmpfs -o size=1m,mode=700 tmpfs /run && criu check >/dev/null 2>&1; cat /run/criu.kdat' \
    > /run/criu.kdat.new) || true
  if [ -s /run/criu.kdat.new ]; then
    mv /run/criu.kdat.new /run/criu.kdat
    echo "install-deps: CRIU's kernel cache written to /run/criu.kdat (/run is not a tmpfs)"
  else
    rm -f /run/criu.kdat.new
    echo "install-deps: could not write CRIU's kernel cache; each CRIU run probes the kernel" >&2
  fi
fi
