#!/usr/bin/env bash
# Runs a command of this project inside a clean Debian 12 root, the way a new user's machine would run it:
# a minimal base made by debootstrap, then the committed tree (HEAD) copied in, then the command. A package
# that was once installed by hand on this machine is not there, so a missing install step fails here.
#
# Usage, as root, from the project's root (needs debootstrap and network access to Debian's mirror):
#   scripts/clean-root.sh                    # ./run.sh setup in the clean root
#   scripts/clean-root.sh ./run.sh test      # the whole suite
# CLEAN_ROOT_DIR (default /var/tmp/meshpilot-clean-root) holds the base, built once and reused; every run
# starts from a fresh copy of it. CLEAN_ROOT_MIRROR picks the Debian mirror.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "clean-root: run as root" >&2; exit 2; }
cd "$(git rev-parse --show-toplevel)"
dir=${CLEAN_ROOT_DIR:-/var/tmp/meshpilot-clean-root}
mirror=${CLEAN_ROOT_MIRROR:-http://deb.debian.org/debian}
base=$dir/base
root=$dir/run
cmd=("$@"); [ ${#cmd[@]} -gt 0 ] || cmd=(./run.sh setup)
say() { printf 'clean-root: %s\n' "$*" >&2; }

mkdir -p "$dir"
if [ ! -x "$base/usr/bin/python3" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  say "making the base root (once): $base"
  rm -rf "$base.new"
  debootstrap --variant=minbase --include=ca-certificates,git,python3,python3-venv,procps \
    bookworm "$base.new" "$mirror" >"$dir/debootstrap.log" 2>&1 || { say "debootstrap failed: $dir/debootstrap.log"; exit 1; }
  mv "$base.new" "$base"
fi

unmount_all() {   # deepest first; tests may leave network-namespace mounts behind
  awk -v r="$root" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
}
trap unmount_all EXIT
unmount_all
rm -rf "$root"
cp -a "$base" "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
mkdir -p "$root/src"
git archive HEAD | tar -x -C "$root/src"

mount --bind "$root" "$root"          # `ip netns` needs the root to be a mount point
mount -t proc proc "$root/proc"
mount -t tmpfs tmpfs "$root/run"
mount --rbind /sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t tmpfs tmpfs "$root/dev/shm"

say "running in the clean root: ${cmd[*]}"
set +e
chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 bash -c "cd /src && $(printf '%q ' "${cmd[@]}")"
rc=$?
set -e
say "exit status $rc"
exit $rc
