#!/usr/bin/env bash
# Runs cri-tools' CRI validation suite (critest) against a private containerd, once per CRI
# runtime handler, and compares every handler with runc.
#
#   CRITEST=/work/critest/critest [STASIS_SHIM=path] [HANDLERS="runc stasis stasis-gvisor"] \
#     [RESULTS=/tmp/critest-results] scripts/critest.sh
#
# Optional: CRICTL (default: crictl next to critest, else on PATH), RUN_TIMEOUT (per handler,
# default 45m), SEED (ginkgo's spec order, the same for every handler; default 1),
# CRITEST_ARGS (extra critest flags, e.g. "-ginkgo.focus=Streaming"), BUSYBOX (the busybox
# binary the test images are built from; default Debian's busybox-static).
#
# Writes RESULTS/<handler>.json (ginkgo's report), RESULTS/<handler>.log, RESULTS/<handler>.tsv
# (spec, state, the gist of its failure or skip message), RESULTS/summary.md (the table and, per
# handler, what passed under runc but not under it) and RESULTS/containerd.log.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "critest.sh: run as root (containerd, mounts, cgroups)" >&2
  exit 1
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
CRITEST="${CRITEST:?set CRITEST to the critest binary (go test -c ./cmd/critest in cri-tools)}"
STASIS_SHIM="${STASIS_SHIM:-$repo/target/debug/containerd-shim-stasis-v2}"
HANDLERS="${HANDLERS:-runc stasis stasis-gvisor}"
RESULTS="${RESULTS:-/tmp/critest-results}"
RUN_TIMEOUT="${RUN_TIMEOUT:-45m}"
SEED="${SEED:-1}"
CRITEST_ARGS="${CRITEST_ARGS:-}"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
CRICTL="${CRICTL:-$(dirname "$CRITEST")/crictl}"
[ -x "$CRICTL" ] || CRICTL="$(command -v crictl || true)"

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "critest.sh: missing ${missing[*]} (apt-get install skopeo docker-registry jq gcc libc6-dev busybox-static)" >&2
    exit 1
  fi
}
need containerd ctr docker-registry skopeo jq cc curl ss sha256sum gzip tar timeout flock ipcs iptables
[ -x "$CRITEST" ] || { echo "critest.sh: $CRITEST is not executable" >&2; exit 1; }
[ -n "$CRICTL" ] && [ -x "$CRICTL" ] || { echo "critest.sh: no crictl (set CRICTL)" >&2; exit 1; }
[ -x "$BUSYBOX" ] || { echo "critest.sh: no busybox at $BUSYBOX (apt-get install busybox-static)" >&2; exit 1; }
case " $HANDLERS " in
  *" stasis"*) [ -x "$STASIS_SHIM" ] || { echo "critest.sh: no shim at $STASIS_SHIM (cargo build)" >&2; exit 1; } ;;
esac

# One run at a time: runs share the CNI bridge name, subnet and host port 12000.
exec 9>/tmp/stasis-critest.lock
flock -n 9 || { echo "critest.sh: another run holds /tmp/stasis-critest.lock" >&2; exit 1; }

# Everything this run creates lives here; the host's containerd, /run/containerd/containerd.sock
# and /etc/containerd are never used.
work="$(mktemp -d /tmp/stasis-critest.XXXXXX)"
# Non-root container users must be able to reach files containerd keeps here (0700 by mktemp).
chmod 0711 "$work"
sock="$work/containerd.sock"
containerd_pid=""
registry_pid=""
current_handler=""
notes=()
# Shims put their sockets in /run/containerd/s whatever containerd's state dir is (containerd's
# convention); remember whether that directory was there so that cleanup removes only what this
# run made.
run_containerd_existed=0
[ -e /run/containerd ] && run_containerd_existed=1
# Likewise the portmap plugin's shared iptables chains.
portmap_chains_existed=0
iptables -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1 && portmap_chains_existed=1
# critest's HostIpc specs make 1 MiB host shm segments (ipcmk -M) and never remove them.
shm_before=" $(ipcs -m 2>/dev/null | awk '$2 ~ /^[0-9]+$/ { printf "%s ", $2 }')"
bridge=stcritest0
cni_name=critest-stasis

log() { printf '[critest.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

cri() { "$CRICTL" --config "$work/crictl.yaml" "$@"; }

# Processes of this run: their command line names our work directory (the shims run from
# $work/bin with `-address $work/containerd.sock`; critest and the registry read files of ours).
# With an argument, only those whose command line also contains it.
our_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [ "$p" = "$$" ] && continue
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" || continue
    case "$cmd" in *"$work/"*) ;; *) continue ;; esac
    case "$cmd" in *"${1:-}"*) echo "$p" ;; esac
  done
  return 0
}

# Removes every pod through CRI, which stops their containers, thaws what a spec left paused and
# ends the pods' shims. A pod whose shim no longer gets its containers stopped is unstuck by
# killing the shims: containerd then runs the shim's `delete`, which cleans up after it.
remove_all_pods() {
  timeout 150 "$CRICTL" --config "$work/crictl.yaml" rmp -fa >/dev/null 2>&1 && return 0
  local shims
  shims="$(our_pids containerd-shim)"
  log "crictl rmp -fa failed; killing this run's shims (${shims//$'\n'/ }) and retrying"
  notes+=("Pods left by ${current_handler:-the run} did not go through \`crictl rmp -fa\`; the run's shims were killed and the pods removed after that (see containerd.log).")
  # shellcheck disable=SC2086
  [ -n "$shims" ] && kill -9 $shims 2>/dev/null
  sleep 3
  timeout 150 "$CRICTL" --config "$work/crictl.yaml" rmp -fa >/dev/null 2>&1 && return 0
  log "crictl rmp -fa failed again"
  return 1
}

# Last resort once containerd is gone: runtime state and stasis pod records that still name this
# run's directories (a shim that died before its `delete` ran), and their pods' cgroups, thawed
# and emptied before they are removed.
release_leftovers() {
  local f root id cg d
  for root in "$work/runc-root/k8s.io" /run/stasis/runc/k8s.io; do
    for f in "$root"/*/state.json; do
      [ -f "$f" ] && grep -qF "$work/" "$f" || continue
      runc --root "$root" delete -f "$(basename "$(dirname "$f")")" >/dev/null 2>&1
    done
  done
  root=/run/stasis/runsc/k8s.io
  for f in "$root"/*.state; do
    [ -f "$f" ] && grep -qF "$work/" "$f" || continue
    id="$(basename "$f")"
    runsc --root "$root" delete -force "${id%%_sandbox:*}" >/dev/null 2>&1
  done
  for f in /run/stasis/pods/*.json; do
    [ -f "$f" ] && grep -qF "$work/" "$f" || continue
    log "removing leftover stasis pod $(basename "$f" .json)"
    cg="$(jq -r '.cgroup // empty' "$f")"
    if [ -n "$cg" ]; then
      # cgroup v1 controllers (/sys/fs/cgroup/<controller>$cg) and v2 (/sys/fs/cgroup$cg)
      for d in /sys/fs/cgroup/*"$cg" "/sys/fs/cgroup$cg"; do
        [ -d "$d" ] || continue
        [ -f "$d/freezer.state" ] && echo THAWED >"$d/freezer.state"
        find "$d" -name cgroup.freeze -exec sh -c 'echo 0 >"$1"' _ {} \;
        find "$d" -name cgroup.procs -exec cat {} + | while read -r pid; do kill -9 "$pid"; done 2>/dev/null
      done
      sleep 1
      for d in /sys/fs/cgroup/*"$cg" "/sys/fs/cgroup$cg"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
      done
    fi
    rm -f "$f"
  done
}

# Host port rules of pods that never got their network torn down (containerd gone before their
# removal): host-local's files in our IPAM directory name them; portmap's DEL removes their rules.
release_network() {
  local f id
  for f in "$work/cni-ipam/$cni_name"/*; do
    case "$(basename "$f")" in lock | last_reserved_ip*) continue ;; esac
    [ -f "$f" ] || continue
    id="$(head -n 1 "$f")"
    printf '{"cniVersion":"1.0.0","name":"%s","type":"portmap","capabilities":{"portMappings":true},"runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":1,"protocol":"tcp"}]}}' "$cni_name" |
      CNI_COMMAND=DEL CNI_CONTAINERID="$id" CNI_NETNS=/nonexistent CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni \
        /usr/lib/cni/portmap >/dev/null 2>&1
  done
}

cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  log "cleaning up $work"
  if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
    remove_all_pods
    kill "$containerd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$containerd_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$containerd_pid" 2>/dev/null
    wait "$containerd_pid" 2>/dev/null
  fi
  # The registry next, so that the scan below finds only what containerd left.
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null
    wait "$registry_pid" 2>/dev/null
  fi
  local left
  left="$(our_pids)"
  if [ -n "$left" ]; then
    log "killing leftover processes: ${left//$'\n'/ }"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null
    sleep 1
  fi
  release_leftovers
  [ -f "$work/containerd.log" ] && mkdir -p "$RESULTS" && cp "$work/containerd.log" "$RESULTS/containerd.log"
  release_network
  # Sockets of shims that were killed (a shim that exits normally removes its own).
  grep -o 'unix:///run/containerd/s/[0-9a-f]*' "$work/containerd.log" 2>/dev/null | sort -u |
    while read -r addr; do rm -f "${addr#unix://}"; done
  # Deepest mounts first: container rootfs, netns, shm and volume mounts under $work.
  awk -v w="$work" '$5 == w || index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  rm -rf "$work"
  # The bridge, once the pods' veths went with their network namespaces.
  for _ in $(seq 20); do
    [ -d "/sys/class/net/$bridge" ] || break
    [ -z "$(ls "/sys/class/net/$bridge/brif" 2>/dev/null)" ] && ip link del "$bridge" 2>/dev/null && break
    sleep 0.5
  done
  # Only if this run created them and nothing else uses them now.
  if [ "$run_containerd_existed" = 0 ]; then
    rmdir /run/containerd/s /run/containerd 2>/dev/null
  fi
  for id in $(ipcs -m 2>/dev/null | awk '$2 ~ /^[0-9]+$/ && $5 == 1048576 && $6 == 0 { print $2 }'); do
    case "$shm_before" in *" $id "*) ;; *) ipcrm -m "$id" 2>/dev/null ;; esac
  done
  if [ "$portmap_chains_existed" = 0 ] && [ "$(iptables -t nat -S CNI-HOSTPORT-DNAT 2>/dev/null | wc -l)" = 1 ]; then
    iptables -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
    iptables -t nat -D OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
    iptables -t nat -D POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
    for chain in CNI-HOSTPORT-MASQ CNI-HOSTPORT-SETMARK CNI-HOSTPORT-DNAT; do
      iptables -t nat -F "$chain" && iptables -t nat -X "$chain"
    done
  fi 2>/dev/null
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$RESULTS"
rm -f "$RESULTS"/*.json "$RESULTS"/*.tsv "$RESULTS"/*.log "$RESULTS/summary.md"

### Test images ##################################################################################
# critest pulls registry.k8s.io/e2e-test-images/{busybox,nginx,httpd,nonewprivs},
# gcr.io/k8s-staging-cri-tools/{test-image-tag,test-image-predefined-group} and pause images.
# There is no internet here, so every one is built from busybox and served by a loopback registry
# that containerd uses as the mirror of every registry (hosts.toml under `_default`). Images keep
# their original names: critest's -registry-prefix cannot be used, because critest pulls the
# prefixed name but then creates the container with the unprefixed one.

rootfs="$work/images/rootfs"
oci="$work/images/oci"
mkdir -p "$oci/blobs/sha256"
printf '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
echo '{"schemaVersion":2,"manifests":[]}' >"$oci/index.json"

# Stores stdin as a blob, prints its digest (sha256:…).
put_blob() {
  local tmp="$oci/blobs/tmp.$$" digest
  cat >"$tmp"
  digest="$(sha256sum "$tmp" | cut -d' ' -f1)"
  mv "$tmp" "$oci/blobs/sha256/$digest"
  echo "sha256:$digest"
}
blob_size() { stat -c %s "$oci/blobs/sha256/${1#sha256:}"; }

# Makes a gzipped layer of directory $1 (owned by root, fixed times: the same tree gives the
# same digest); prints "<blob digest> <diff id>".
make_layer() {
  local tar="$work/images/layer.tar" diff_id
  tar --create --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$1" -f "$tar" .
  diff_id="sha256:$(sha256sum "$tar" | cut -d' ' -f1)"
  echo "$(gzip -n <"$tar" | put_blob) $diff_id"
  rm -f "$tar"
}

# add_image NAME CONFIG_JSON LAYER... : an image in the OCI layout, tagged NAME in index.json.
# CONFIG_JSON is the image's runtime config (Cmd, Entrypoint, User, …); a layer is "digest diffid".
add_image() {
  local name="$1" runtime_config="$2" layers_json="[]" diffs_json="[]" layer digest diff
  shift 2
  for layer in "$@"; do
    read -r digest diff <<<"$layer"
    layers_json="$(jq -c --arg d "$digest" --argjson s "$(blob_size "$digest")" \
      '. + [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $d, size: $s}]' <<<"$layers_json")"
    diffs_json="$(jq -c --arg d "$diff" '. + [$d]' <<<"$diffs_json")"
  done
  local config manifest
  config="$(jq -cn --argjson c "$runtime_config" --argjson d "$diffs_json" \
    '{architecture: "amd64", os: "linux", config: $c, rootfs: {type: "layers", diff_ids: $d},
      history: [{created_by: "stasis scripts/critest.sh"}]}' | put_blob)"
  manifest="$(jq -cn --arg c "$config" --argjson cs "$(blob_size "$config")" --argjson l "$layers_json" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: $l}' | put_blob)"
  jq --arg m "$manifest" --argjson s "$(blob_size "$manifest")" --arg n "$name" \
    '.manifests += [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $s,
      annotations: {"org.opencontainers.image.ref.name": $n}}]' "$oci/index.json" >"$oci/index.json.new"
  mv "$oci/index.json.new" "$oci/index.json"
}

build_images() {
  log "building test images from $BUSYBOX"
  local base="$rootfs/base"
  mkdir -p "$base"/{bin,etc,root,proc,sys,dev,var/run,home/default-user,usr/local/bin}
  install -d -m 1777 "$base/tmp"
  cp "$BUSYBOX" "$base/bin/busybox"
  # A dynamically linked busybox (e.g. Debian's `busybox`, whose shell runs /bin/ls rather than
  # its built-in applet, as critest's MaskedPaths spec expects) brings its libraries along.
  if ldd "$BUSYBOX" >/dev/null 2>&1; then
    ldd "$BUSYBOX" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
      mkdir -p "$base$(dirname "$lib")"
      cp -L "$lib" "$base$lib"
    done
  fi
  local applet
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln "$base/bin/busybox" "$base/bin/$applet"
  done
  # Users critest's specs name: root, nobody (RunAsUserName), uid 1000 (NoNewPrivs,
  # SupplementalGroupsPolicy), www-data (image user specs).
  cat >"$base/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/bin/false
default-user:x:1000:1000:default-user:/home/default-user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$base/etc/group" <<'EOF'
root:x:0:
www-data:x:33:
default-user:x:1000:
nogroup:x:65534:
EOF
  # Debian's busybox-static has no pgrep; critest runs `pgrep sleep` (execSync timeout).
  cat >"$base/bin/pgrep" <<'EOF'
#!/bin/sh
# pgrep stand-in: the PIDs of processes whose name contains $1.
status=1
for dir in /proc/[0-9]*; do
  read -r name <"$dir/comm" 2>/dev/null || continue
  case "$name" in *"$1"*) echo "${dir#/proc/}"; status=0 ;; esac
done
exit $status
EOF
  chmod 755 "$base/bin/pgrep"
  # Programs busybox cannot stand in for, built static so that the images need no libc.
  local src="$work/images/src"
  mkdir -p "$src"
  cat >"$src/pause.c" <<'EOF'
/* The pod sandbox's first process: waits, reaps orphans, ends on SIGINT/SIGTERM. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = stop;
  sigaction(SIGINT, &sa, 0);
  sigaction(SIGTERM, &sa, 0);
  sa.sa_handler = reap;
  sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, 0);
  for (;;) pause();
}
EOF
  cat >"$src/ipcs.c" <<'EOF'
/* `ipcs -m` (busybox-static has no ipcs): the shared memory segments of this IPC namespace,
   found through shmctl as util-linux's ipcs does (critest's HostIpc specs). */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/shm.h>
int main(void) {
  struct shm_info info;
  struct shmid_ds ds;
  int max = shmctl(0, SHM_INFO, (struct shmid_ds *)&info);
  printf("------ Shared Memory Segments --------\nkey        shmid\n");
  if (max < 0) { perror("ipcs: shmctl(SHM_INFO)"); return 1; }
  for (int i = 0; i <= max; i++) {
    int id = shmctl(i, SHM_STAT, &ds);
    if (id >= 0) printf("0x%08x %d\n", (unsigned)ds.shm_perm.__key, id);
  }
  return 0;
}
EOF
  cat >"$src/nnp.c" <<'EOF'
/* Set-uid root: prints the effective uid it got (critest's NoNewPrivs specs). */
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
EOF
  local pause="$rootfs/pause" nnp="$rootfs/nnp"
  mkdir -p "$pause" "$nnp/usr/local/bin"
  cc -static -O2 -o "$pause/pause" "$src/pause.c"
  cc -static -O2 -o "$nnp/usr/local/bin/nnp" "$src/nnp.c"
  cc -static -O2 -o "$base/bin/ipcs" "$src/ipcs.c"
  chmod 4755 "$nnp/usr/local/bin/nnp"
  local base_layer
  base_layer="$(make_layer "$base")"
  local path_env='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

  add_image busybox "{\"Env\":[\"$path_env\"],\"Cmd\":[\"sh\"]}" "$base_layer"

  add_image pause '{"Entrypoint":["/pause"]}' "$(make_layer "$pause")"
  add_image nonewprivs "{\"Env\":[\"$path_env\"],\"Cmd\":[\"/usr/local/bin/nnp\"]}" \
    "$base_layer" "$(make_layer "$nnp")"

  # nginx stand-in. critest needs: a process named nginx (pidof), "master process" in PID 1's
  # command line (PodPID/ContainerPID), its PID in /var/run/nginx.pid (HostPID) and HTTP 200
  # on port 80 (port mapping, port forward).
  local nginx="$rootfs/nginx"
  mkdir -p "$nginx/usr/sbin" "$nginx/usr/share/nginx/html"
  echo '<html><body>stand-in nginx</body></html>' >"$nginx/usr/share/nginx/html/index.html"
  cat >"$nginx/usr/sbin/nginx" <<'EOF'
#!/bin/sh
# Re-run under a title like nginx's master process (the kernel names the process after this
# file either way).
case "$1" in
  "master process") shift ;;
  *) exec /usr/sbin/nginx "master process" "$@" ;;
esac
echo $$ >/var/run/nginx.pid
trap 'kill "$server" 2>/dev/null; exit 0' INT TERM QUIT
httpd -f -p 80 -h /usr/share/nginx/html &
server=$!
wait "$server"
EOF
  chmod 755 "$nginx/usr/sbin/nginx"
  add_image nginx "{\"Env\":[\"$path_env\"],\"Cmd\":[\"nginx\",\"-g\",\"daemon off;\"],\"ExposedPorts\":{\"80/tcp\":{}}}" \
    "$base_layer" "$(make_layer "$nginx")"

  # httpd stand-in: serves port 80 and says "httpd" on stdout (the multi-container log spec).
  local httpd="$rootfs/httpd"
  mkdir -p "$httpd/usr/local/bin" "$httpd/usr/local/apache2/htdocs"
  echo '<html><body>It works!</body></html>' >"$httpd/usr/local/apache2/htdocs/index.html"
  cat >"$httpd/usr/local/bin/httpd-foreground" <<'EOF'
#!/bin/sh
echo "httpd: serving /usr/local/apache2/htdocs on port 80"
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
EOF
  chmod 755 "$httpd/usr/local/bin/httpd-foreground"
  add_image httpd "{\"Env\":[\"$path_env\"],\"Cmd\":[\"httpd-foreground\"],\"ExposedPorts\":{\"80/tcp\":{}}}" \
    "$base_layer" "$(make_layer "$httpd")"

  # uid 1000 is in group 50000 in the image's /etc/group (SupplementalGroupsPolicy specs).
  local grouped="$rootfs/grouped"
  mkdir -p "$grouped/etc"
  cp "$base/etc/passwd" "$grouped/etc/passwd"
  { cat "$base/etc/group"; echo "group-defined-in-image:x:50000:default-user"; } >"$grouped/etc/group"
  add_image predefined-group "{\"Env\":[\"$path_env\"],\"User\":\"1000\",\"Cmd\":[\"sh\"]}" \
    "$base_layer" "$(make_layer "$grouped")"
}

start_registry() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 20000))
    [ -z "$(ss -Hltn "sport = :$port")" ] && break
  done
  mkdir -p "$work/registry"
  cat >"$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
EOF
  docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 9>&- &
  registry_pid=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
    kill -0 "$registry_pid" 2>/dev/null || { cat "$work/registry/log" >&2; return 1; }
    sleep 0.1
  done
  registry="127.0.0.1:$port"
  log "registry on $registry"
}

# Every name critest uses (path part; the host part goes through the mirror) → local image.
declare -A image_names=(
  [e2e-test-images/busybox:1.29-2]=busybox
  [e2e-test-images/nginx:1.14-2]=nginx
  [e2e-test-images/httpd:2.4.39-4]=httpd
  [e2e-test-images/nonewprivs:1.3]=nonewprivs
  [k8s-staging-cri-tools/test-image-tag:test]=busybox
  [k8s-staging-cri-tools/test-image-predefined-group:latest]=predefined-group
  [pause:3.10]=pause
  [pause:3.9]=pause
)

push_images() {
  local name
  for name in "${!image_names[@]}"; do
    skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
      "oci:$oci:${image_names[$name]}" "docker://$registry/$name"
  done
}

### containerd ###################################################################################

write_containerd_config() {
  mkdir -p "$work/bin" "$work/etc-stasis" "$work/cni" "$work/certs.d/_default"
  if [ -x "$STASIS_SHIM" ]; then
    # A copy, so that a rebuild during the run does not change the shim under test; the other
    # names pick the shim's backend (as in tests/src/containerd.rs).
    cp "$STASIS_SHIM" "$work/bin/containerd-shim-stasis-v2"
    ln -s containerd-shim-stasis-v2 "$work/bin/containerd-shim-stasis-gvisor-v2"
    ln -s containerd-shim-stasis-v2 "$work/bin/containerd-shim-stasis-crun-v2"
  fi
  # Every registry is mirrored by the loopback one, over plain http.
  cat >"$work/certs.d/_default/hosts.toml" <<EOF
server = "http://$registry"

[host."http://$registry"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
EOF
  # bridge + host-local with names and a subnet of our own, loopback, and portmap for the
  # host-port spec.
  cat >"$work/cni/10-critest.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$cni_name",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.231.0.0/16"}]],
        "dataDir": "$work/cni-ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
  # The handlers as the test harness (tests/src/containerd.rs) defines them. NRI is off (it
  # would fight other containerds for /var/run/nri/nri.sock); root here cannot lower
  # oom_score_adj; runc's state and the pods' netns stay under $work.
  cat >"$work/config.toml" <<EOF
version = 3
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$sock.ttrpc"

[debug]
  address = "$work/debug.sock"
  level = "info"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = "$work/certs.d"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$work/cni"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      Root = "$work/runc-root"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis]
    runtime_type = "io.containerd.stasis.v2"
    sandboxer = "shim"
    container_annotations = ["io.stasis.*"]
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis-gvisor]
    runtime_type = "io.containerd.stasis-gvisor.v2"
    sandboxer = "shim"
    container_annotations = ["io.stasis.*"]
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis-crun]
    runtime_type = "io.containerd.stasis-crun.v2"
    sandboxer = "shim"
    container_annotations = ["io.stasis.*"]
EOF
  cat >"$work/crictl.yaml" <<EOF
runtime-endpoint: unix://$sock
image-endpoint: unix://$sock
timeout: 60
EOF
}

start_containerd() {
  # The shims come from $work/bin; their backend settings from an empty directory of ours,
  # never the host's /etc/stasis.
  PATH="$work/bin:$PATH" STASIS_CONFIG_DIR="$work/etc-stasis" \
    containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 </dev/null 9>&- &
  containerd_pid=$!
  for _ in $(seq 300); do
    cri info >/dev/null 2>&1 && { log "containerd $containerd_pid up on $sock"; return 0; }
    kill -0 "$containerd_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 40 "$work/containerd.log" >&2
  echo "critest.sh: containerd did not come up" >&2
  return 1
}

# Pulls every image through CRI now: proves the registry mirror works before a long run, and
# keeps pull time out of the specs.
pull_images() {
  local name host
  for name in "${!image_names[@]}"; do
    case "$name" in
      e2e-test-images/* | pause:*) host=registry.k8s.io ;;
      *) host=gcr.io ;;
    esac
    cri pull "$host/$name" >/dev/null
  done
  cri pull k8s.gcr.io/pause:3.9 >/dev/null
}

### critest ######################################################################################

# Specs not run: image service only (Image Manager, Image Consistency, RemoveImage; they need
# distinct upstream images and digests this registry does not have), host network (containerd
# 2.1 crashes on host-network pods in shim sandbox mode; README "Limits"), Windows.
skips=(
  -ginkgo.skip='\[k8s\.io\] Image Manager'
  -ginkgo.skip='\[k8s\.io\] Image Consistency'
  -ginkgo.skip='RemoveImage'
  -ginkgo.skip='HostNetwork is true'
  -ginkgo.skip='portforward in host network'
  -ginkgo.skip='Windows'
)

run_handler() {
  local handler="$1" timeout_s
  current_handler="$handler"
  log "critest -runtime-handler $handler (log: $RESULTS/$handler.log)"
  # critest's own deadline comes first so that ginkgo still writes its report; the outer one
  # catches a hung critest.
  timeout_s="$(( $(sed 's/m$/*60/; s/h$/*3600/; s/s$//' <<<"$RUN_TIMEOUT") ))"
  # shellcheck disable=SC2086 # CRITEST_ARGS is a list of flags
  timeout -k 30 "$((timeout_s + 120))" "$CRITEST" \
    -config "$work/crictl.yaml" \
    -runtime-endpoint "unix://$sock" -image-endpoint "unix://$sock" \
    -runtime-handler "$handler" \
    "${skips[@]}" \
    -ginkgo.seed="$SEED" -ginkgo.timeout="$RUN_TIMEOUT" -ginkgo.no-color \
    -ginkgo.json-report="$RESULTS/$handler.json" \
    $CRITEST_ARGS >"$RESULTS/$handler.log" 2>&1 9>&- || true
  # A spec that failed half-way can leave pods behind; the next handler starts clean.
  remove_all_pods || notes+=("Pods left by $handler could not be removed through CRI (see containerd.log).")
  if [ -f "$RESULTS/$handler.json" ]; then
    # spec name, state, and the gist of its failure (or skip) message: the first line plus the
    # lines that say what went wrong (gomega's "Expected … to equal …", the rpc error), without
    # the type headers and struct dumps, ids shortened.
    jq -r 'def gist:
        split("\n") | map(gsub("^\\s+|\\s+$"; "")) | map(select(length > 0))
        | (.[0] // "") as $first
        | .[1:] | (index("{") // length) as $stop | .[0:$stop]
        | map(select(test("^<[^>]*>:?$|^Unexpected error:$|^Expected success, but got an error:$|^occurred$") | not))
        | [$first] + .[0:4] | join(" ")
        | gsub("[0-9a-f]{64}"; "<id>") | gsub("\\s+"; " ")
        | if length > 300 then .[0:300] + "…" else . end;
      .[0].SpecReports[] | select(.LeafNodeType == "It")
      | [((.ContainerHierarchyTexts // []) + [.LeafNodeText] | join(" ")), .State,
         ((.Failure.Message // "") | gist)]
      | @tsv' "$RESULTS/$handler.json" | sort >"$RESULTS/$handler.tsv"
  fi
}

count() { # count FILE STATE-REGEX
  awk -F'\t' -v re="$2" '$2 ~ re { n++ } END { print n + 0 }' "$1"
}

summarize() {
  local h base="$RESULTS/runc.tsv"
  {
    echo "| handler | passed | failed | skipped |"
    echo "|---|---|---|---|"
    for h in $HANDLERS; do
      if [ -f "$RESULTS/$h.tsv" ]; then
        echo "| $h | $(count "$RESULTS/$h.tsv" '^passed$') | $(count "$RESULTS/$h.tsv" '^(failed|panicked|timedout|interrupted|aborted)$') | $(count "$RESULTS/$h.tsv" '^(skipped|pending)$') |"
      else
        echo "| $h | no report (see $h.log) | | |"
      fi
    done
    echo
    echo "Skipped counts include the specs left out by -ginkgo.skip (image service, host network, Windows) and critest's benchmarks."
    for note in "${notes[@]}"; do echo "$note"; done
    if [ -f "$base" ]; then
      for h in $HANDLERS; do
        [ "$h" = runc ] && continue
        [ -f "$RESULTS/$h.tsv" ] || continue
        echo
        echo "### Passed under runc, not under $h"
        echo
        # Join on the spec name: runc's passed specs whose state under $h is anything else.
        awk -F'\t' 'NR == FNR { if ($2 == "passed") ok[$1] = 1; next }
          ($1 in ok) && $2 != "passed" { printf "- %s — **%s**: %s\n", $1, $2, ($3 == "" ? "(no message)" : $3); n++ }
          END { if (!n) print "(none)" }' "$base" "$RESULTS/$h.tsv"
      done
    fi
  } | tee "$RESULTS/summary.md"
}

build_images
start_registry
push_images
write_containerd_config
start_containerd
pull_images
for handler in $HANDLERS; do
  run_handler "$handler"
done
summarize
