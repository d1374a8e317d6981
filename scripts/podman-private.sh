#!/usr/bin/env bash
# Podman from Debian trixie for the benches, unpacked into a private directory instead of
# installed: on bookworm, `apt-get install -t trixie podman` replaces the system's systemd,
# util-linux and openssl. Here podman, conmon, netavark and the libraries they need that
# bookworm lacks are unpacked with `dpkg -x`, and a wrapper runs podman with its own
# containers.conf, library path and HOME (for a policy.json that accepts the local images the
# benches load). Prints the wrapper's path. Never run by CI.
#   scripts/podman-private.sh [DIR]   (default /var/lib/stasis-bench/podman)
set -euo pipefail
dir="${1:-/var/lib/stasis-bench/podman}"
wrapper="$dir/bin/podman"
umask 077
if ! [ -x "$dir/root/usr/bin/podman" ]; then
    rm -rf "$dir"
    mkdir -p "$dir/debs" "$dir/root"
    # apt's sandbox user cannot write into a 0700 directory: download as root.
    (cd "$dir/debs" && apt-get download -q -o APT::Sandbox::User=root -t trixie \
        podman conmon netavark golang-github-containers-common \
        libgpgme11t64 libassuan9 libgpg-error0 libsubid5 libsqlite3-0 libglib2.0-0t64 libsystemd0 \
        >/dev/null)
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
fi
mkdir -p "$dir/bin" "$dir/home/.config/containers" "$dir/tmp" "$dir/networks"
# Everything Podman keeps outside the storage the benches name (--root, --runroot) stays here
# too: its locks as files (not /dev/shm/libpod_lock), its tmp_dir (not /run/libpod), its
# network configs.
cat > "$dir/containers.conf" <<EOF
[engine]
conmon_path = ["$dir/root/usr/bin/conmon"]
helper_binaries_dir = ["$dir/root/usr/lib/podman"]
events_logger = "file"
cgroup_manager = "cgroupfs"
runtime = "runc"
lock_type = "file"
tmp_dir = "$dir/tmp"
[network]
network_backend = "netavark"
network_config_dir = "$dir/networks"
EOF
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$dir/home/.config/containers/policy.json"
cat > "$wrapper" <<EOF
#!/bin/sh
HOME="$dir/home" CONTAINERS_CONF="$dir/containers.conf" \\
LD_LIBRARY_PATH="$dir/root/usr/lib/x86_64-linux-gnu" PODMAN_IGNORE_CGROUPSV1_WARNING=1 \\
exec "$dir/root/usr/bin/podman" "\$@"
EOF
chmod 0700 "$wrapper"
"$wrapper" --version >/dev/null
echo "$wrapper"
