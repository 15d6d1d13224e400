#!/usr/bin/env bash
# Builds the CUDA image of pruneserve without a container registry or a Docker engine: the base is
# a Debian bookworm root filesystem assembled from the Debian archive (mmdebstrap), the CUDA 13.0
# runtime libraries come from the PyPI wheels of scripts/cuda-toolchain.sh, and buildah (vfs
# storage, no daemon) assembles them with the CUDA build of pruneserve into an OCI archive that
# `podman load` / `docker load` / `skopeo copy` take. The NVIDIA container toolkit mounts the
# driver (libcuda.so.1) at run time, as for any CUDA image.
#
# Then it checks the image: its pruneserve runs inside the image's root filesystem (chroot) and
# finds every library it links, with a stub standing in for the driver library.
#
# Usage (as root; Debian packages mmdebstrap and buildah):
#   docker/build-cuda-image.sh [OUT.tar]          # builds the binary first
#   BIN=path/to/pruneserve docker/build-cuda-image.sh [OUT.tar]
set -euo pipefail
OUT=$(realpath -m "${1:-pruneserve-cuda.oci.tar}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
ctr=
cleanup() { [ -n "$ctr" ] && buildah rm "$ctr" > /dev/null 2>&1; rm -rf "$WORK"; }
trap cleanup EXIT

source <("$ROOT/scripts/cuda-toolchain.sh")
if [ -z "${BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --features cuda -p pruneserve)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pruneserve
fi

mmdebstrap --quiet --variant=apt --include=ca-certificates bookworm "$WORK/rootfs.tar" \
  http://deb.debian.org/debian
mkdir -p "$WORK/cuda/lib64"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 \
  libnvrtc-builtins.so.13.0; do
  cp -L "$CUDA_HOME/lib/$lib" "$WORK/cuda/lib64/"
done

ctr=$(buildah from scratch)
buildah add --quiet "$ctr" "$WORK/rootfs.tar" /
buildah add --quiet "$ctr" "$WORK/cuda" /usr/local/cuda
buildah add --quiet --chmod 755 "$ctr" "$BIN" /usr/local/bin/pruneserve
buildah config \
  --env LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64 \
  --env NVIDIA_VISIBLE_DEVICES=all --env NVIDIA_DRIVER_CAPABILITIES=compute,utility \
  --port 8000 --entrypoint '["pruneserve"]' \
  --cmd 'serve --host 0.0.0.0 --port 8000 --device cuda --kv-cache-gb 20' \
  --label org.opencontainers.image.title=pruneserve "$ctr"

# The check: run the image's binary in its own root filesystem, the driver library stubbed.
mnt=$(buildah mount "$ctr")
mkdir -p "$mnt/tmp/driver-stub"
cp "$CUDA_HOME/lib/stubs/libcuda.so" "$mnt/tmp/driver-stub/libcuda.so.1"
LD_LIBRARY_PATH=/usr/local/cuda/lib64:/tmp/driver-stub chroot "$mnt" \
  /usr/local/bin/pruneserve serve --help > "$WORK/help.txt"
grep -q -- "--data-parallel" "$WORK/help.txt"
echo "the image's pruneserve runs in the image and links: $(head -1 "$WORK/help.txt")"
rm -rf "$mnt/tmp/driver-stub"
buildah umount "$ctr" > /dev/null

buildah commit --quiet "$ctr" pruneserve:cuda > /dev/null
rm -f "$OUT"
buildah push --quiet pruneserve:cuda "oci-archive:$OUT:pruneserve:cuda"
echo "wrote $OUT ($(du -h "$OUT" | cut -f1)), image pruneserve:cuda"
