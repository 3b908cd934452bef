"""Starts the process of an unpacked OCI bundle (`umoci unpack`) the way a container runtime would,
for machines where `podman run` cannot start containers: its args (the image's entrypoint), env,
working directory and user from the bundle's config.json, in a chroot of its rootfs mounted
read-only, with tmpfs at the working directory and /tmp (the pod's emptyDir volumes).

Must run as root inside a private mount namespace, so the mounts vanish with it:
    unshare --mount --propagation private python3 deploy/check/run_bundle.py BUNDLE [NAME=VALUE ...]
NAME=VALUE pairs are added to (or replace in) the image's environment, e.g. QUIVER_PORT=18000.
The process replaces this one (exec), so its exit status and signals are the server's.
"""

import json
import os
import subprocess
import sys


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bundle = os.path.abspath(sys.argv[1])
    with open(os.path.join(bundle, "config.json")) as f:
        process = json.load(f)["process"]
    rootfs = os.path.join(bundle, "rootfs")
    env = dict(e.split("=", 1) for e in process.get("env", []))
    env.update(a.split("=", 1) for a in sys.argv[2:])
    uid, gid = process["user"]["uid"], process["user"]["gid"]
    cwd = process.get("cwd", "/")

    # readOnlyRootFilesystem: the image's files, read-only.
    mount("--bind", rootfs, rootfs)
    mount("-o", "remount,bind,ro", rootfs)
    # The volumes the pod gives it: an emptyDir at the working directory and at /tmp.
    mount("-t", "tmpfs", "-o", f"mode=0755,uid={uid},gid={gid},size=512m", "tmpfs", rootfs + cwd)
    mount("-t", "tmpfs", "-o", "mode=1777,size=64m", "tmpfs", os.path.join(rootfs, "tmp"))

    os.chroot(rootfs)
    os.chdir(cwd)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    args = process["args"]
    os.execve(args[0], args, env)


if __name__ == "__main__":
    main()
