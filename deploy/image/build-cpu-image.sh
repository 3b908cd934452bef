#!/usr/bin/env bash
# Builds the CPU image without pulling any base image: a root file system holding the `quiver`
# binary and the shared libraries `ldd` resolves for it, then Containerfile.cpu (FROM scratch)
# with buildah. Run as root (buildah's storage, and the rootfs files' owners).
#
# Usage: deploy/image/build-cpu-image.sh [BINARY] [OUT_DIR]
#   BINARY   default target/release/quiver (cargo build --release --locked -p quiver)
#   OUT_DIR  default target/deploy
# Writes OUT_DIR/quiver-cpu.oci.tar (OCI archive: `podman load -i`, or `skopeo copy
# oci-archive:OUT_DIR/quiver-cpu.oci.tar docker://REGISTRY/quiver:TAG` to publish it) and
# OUT_DIR/layout (an OCI image layout, tag quiver-cpu), and prints the image's size.
set -euo pipefail
bin=${1:-target/release/quiver}
out=${2:-target/deploy}
here=$(cd "$(dirname "$0")" && pwd)
for tool in buildah ldd objcopy tar; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install buildah binutils" >&2; exit 1; }
done
[ -x "$bin" ] || { echo "$bin: no such binary (cargo build --release --locked -p quiver)" >&2; exit 1; }

rm -rf "$out/ctx" "$out/layout" "$out/quiver-cpu.oci.tar" "$out/storage" "$out/run"
root=$out/ctx/rootfs
mkdir -p "$root"
install -D -m 0755 "$bin" "$root/usr/local/bin/quiver"
# The release profile keeps line tables (debug = 1) for backtraces on the build machine; they
# are most of the binary and useless in the image.
objcopy --strip-debug "$root/usr/local/bin/quiver"
# Every library the dynamic loader resolves (`name => /path`) and the loader itself, at the same
# paths, so the binary runs unchanged. Anything dlopen()ed at run time is not listed: the CPU build
# loads nothing (the CUDA build loads the driver and NVRTC: see Containerfile.cuda).
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
    while read -r lib; do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
mkdir -p "$root/etc" "$root/tmp" "$root/var/lib/quiver" "$root/models" "$root/adapters" \
    "$root/proc" "$root/sys" "$root/dev"
printf 'root:x:0:0:root:/root:/sbin/nologin\nquiver:x:65532:65532:quiver:/var/lib/quiver:/sbin/nologin\n' \
    >"$root/etc/passwd"
printf 'root:x:0:\nquiver:x:65532:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
# Quiver's working directory (the demo model is written under it): the pod mounts an emptyDir
# here, and the image makes it the user's for runtimes that run without one.
chown 65532:65532 "$root/var/lib/quiver"
# Sorted names and fixed times: the same binary gives the same layer.
tar --sort=name --mtime=@0 --numeric-owner -C "$root" -cf "$out/ctx/rootfs.tar" .
cp "$here/Containerfile.cpu" "$out/ctx/Containerfile"

b=(buildah --root "$PWD/$out/storage" --runroot "$PWD/$out/run" --storage-driver vfs)
"${b[@]}" bud --quiet --format oci --pull-never --layers=false -f "$out/ctx/Containerfile" \
    -t localhost/quiver:cpu "$out/ctx" >/dev/null
"${b[@]}" push --quiet localhost/quiver:cpu "oci:$out/layout:quiver-cpu"
"${b[@]}" push --quiet localhost/quiver:cpu "oci-archive:$out/quiver-cpu.oci.tar:quiver:cpu"
"${b[@]}" rmi --all --force >/dev/null
rm -rf "$out/storage" "$out/run"

unpacked=$(du -sb "$root" | cut -f1)
archive=$(stat -c %s "$out/quiver-cpu.oci.tar")
echo "CPU image: $out/quiver-cpu.oci.tar: $((archive / 1024 / 1024)) MiB compressed," \
    "$((unpacked / 1024 / 1024)) MiB unpacked ($(find "$root" -type f | wc -l) files)"
