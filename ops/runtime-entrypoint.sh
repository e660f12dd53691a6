#!/bin/sh
# Entry point of the runtime image (ops/Dockerfile, --target runtime): prepares what the Linux
# sandbox backend needs inside its container, then execs `enablement "$@"` as the same process.
#
# cgroups v2. The backend makes `creto/<instance>/<sandbox>` cgroups under /sys/fs/cgroup and
# enables the memory, pids and cpu controllers on the way down. So that sandboxes count against
# this pod's own limits and two pods on one node never share cgroups, /sys/fs/cgroup must show
# this container's cgroup as its root; and that root must hold no process, because cgroup v2
# hands controllers to child cgroups only from a cgroup without processes of its own.
#   1. A privileged container gets no cgroup namespace from containerd or CRI-O: it sees the
#      host's whole tree, its own cgroup somewhere below. Then this script runs itself again in
#      a new cgroup namespace rooted at that cgroup, with cgroup2 mounted anew in a private
#      mount namespace.
#   2. Every process of the root (this one) moves into the leaf /sys/fs/cgroup/init.
# cgroups v1: nothing to do here; the hierarchies are the host's, so the StatefulSet allows one
# runtime pod per node (ops/k8s/base/runtime/statefulset.yaml).
#
# Because of step 1 the sandboxes' network namespaces are mounted in this process's mount
# namespace, not the one `kubectl exec` lands in: look at them with
#   kubectl exec <pod> -- nsenter -t 1 -m ip netns list
set -eu

CG=/sys/fs/cgroup
say() { printf 'runtime-entrypoint: %s\n' "$*" >&2; }

if [ -f "$CG/cgroup.controllers" ]; then
    own=$(sed -n 's/^0:://p' /proc/self/cgroup)
    if [ "$own" != "/" ]; then
        if [ -n "${CRETO_CGROUPNS:-}" ]; then
            say "still not at the root of a cgroup namespace (cgroup $own); giving up"
            exit 2
        fi
        export CRETO_CGROUPNS=1
        exec unshare --cgroup --mount --propagation private -- "$0" "$@"
    fi
    if [ -n "${CRETO_CGROUPNS:-}" ]; then
        unset CRETO_CGROUPNS
        mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$CG"
    fi
    if ! mkdir -p "$CG/init" 2>/dev/null; then
        mount -o remount,rw "$CG" 2>/dev/null || true
        if ! mkdir -p "$CG/init" 2>/dev/null; then
            say "$CG is read-only: the runtime container must be privileged (see ops/k8s/base/runtime/statefulset.yaml)"
            exit 2
        fi
    fi
    for pid in $(cat "$CG/cgroup.procs"); do
        echo "$pid" >"$CG/init/cgroup.procs" 2>/dev/null || true
    done
    for c in memory pids cpu; do
        if ! grep -qw "$c" "$CG/cgroup.controllers"; then
            say "the $c controller is not available to this container (cgroup.controllers: $(cat "$CG/cgroup.controllers"))"
            exit 2
        fi
    done
fi

mkdir -p /run/netns 2>/dev/null || true
exec enablement "$@"
