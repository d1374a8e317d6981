#!/usr/bin/env bash
# Can CRIU stream a dump's images (`--stream`: pages spliced into a pipe to an image
# streamer instead of written to files) when an OCI runtime drives it? runc runs CRIU through
# its RPC service (`criu swrk`); the only way to give that CRIU an option runc has no flag for
# is the configuration file named by the container's `org.criu.config` annotation. This
# probe runs a busybox container with plain runc, dumps it live once with an empty CRIU
# configuration (the control) and once with `stream` in it (a socket listening where the
# streamer would), and prints how each ended. Needs root, runc, CRIU and busybox (what
# scripts/install-deps.sh installs). Leaves nothing behind. Never run by CI.
#   sudo scripts/probe-criu-stream.sh
set -euo pipefail
dir="$(mktemp -d /tmp/stasis-criu-stream.XXXXXXXX)"
id="stasis-stream-probe-$$"
cleanup() {
    runc delete -f "$id" >/dev/null 2>&1 || true
    [ -n "${listener:-}" ] && kill "$listener" 2>/dev/null || true
    [ -n "${holder:-}" ] && kill -- "-$holder" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
bundle="$dir/bundle"
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/dev" "$bundle/rootfs/sys"
cp "$(command -v busybox)" "$bundle/rootfs/bin/busybox"
ln -s busybox "$bundle/rootfs/bin/sh"
ln -s busybox "$bundle/rootfs/bin/sleep"
(cd "$bundle" && runc spec)
python3 - "$bundle/config.json" "$dir/criu.conf" <<'EOF'
import json, sys
path, conf = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c", "while true; do sleep 1; done"]
c["root"]["readonly"] = False
c.setdefault("annotations", {})["org.criu.config"] = conf
# The host's network namespace: nothing to set up, and CRIU leaves it alone.
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
json.dump(c, open(path, "w"))
EOF
# The container's stdio are pipes (CRIU cannot dump a descriptor on a regular host file).
# In a session of its own, so the clean-up can end the pipe's holders as a group.
setsid bash -c 'cd "$1" && sleep 100000 | runc run -d "$2" 2>&1 | cat >/dev/null' _ "$bundle" "$id" &
holder=$!
for _ in $(seq 50); do
    runc state "$id" 2>/dev/null | grep -q '"running"' && break
    sleep 0.1
done
runc state "$id" | grep -q '"running"' || { echo "the probe container did not start"; exit 1; }

dump() { # $1: name, $2: CRIU configuration
    local images="$dir/$1-images" work="$dir/$1-work"
    mkdir -p "$images" "$work"
    printf '%s' "$2" >"$dir/criu.conf"
    if [ "$1" = stream ]; then
        # Something listening where CRIU's streamer socket goes, so a CRIU that streams can
        # connect (its images are then read and dropped).
        python3 -c 'import socket,sys,time
s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); time.sleep(60)' \
            "$images/streamer-capture.sock" &
        listener=$!
        sleep 0.3
    fi
    local out rc=0
    out="$(runc checkpoint --leave-running --image-path "$images" --work-path "$work" "$id" 2>&1)" || rc=$?
    echo "== $1 (CRIU configuration: '${2//$'\n'/ }')"
    echo "runc checkpoint: exit $rc ${out:+($out)}"
    if [ -f "$work/dump.log" ]; then
        echo "CRIU: $(grep -E 'Dumping finished|Dumping FAILED|Error' "$work/dump.log" | tail -1)"
    else
        echo "CRIU: no dump.log (CRIU ended before writing its log)"
    fi
    echo "container: $(runc state "$id" | grep -o '"status": "[a-z]*"')"
}
dump control ""
dump stream $'stream\n'
# Why CRIU ends: its RPC service opens the images directory with no streaming mode.
if command -v strace >/dev/null; then
    mkdir -p "$dir/traced-images" "$dir/traced-work"
    strace -f -qq -e trace=none -e signal=SIGABRT -o "$dir/strace" \
        runc checkpoint --leave-running --image-path "$dir/traced-images" \
        --work-path "$dir/traced-work" "$id" >/dev/null 2>&1 || true
    echo "== strace of the stream dump: $(grep -m1 -E 'SIGABRT|killed by' "$dir/strace" || echo 'no signal seen')"
fi
