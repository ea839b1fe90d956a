#!/bin/sh
# Give bcc a kernel header tree when the running kernel ships none.
#
# bcc compiles every program against kernel headers. Distribution kernels
# (Debian guests) have them at /lib/modules/$(uname -r)/build and nothing is
# done. A vendor kernel without headers (the CI machine) gets Debian's
# linux-headers packages merged into ONE tree, because BCC_KERNEL_SOURCE takes a
# single directory and the flavour package alone lacks include/linux/kconfig.h
# (shared/reference/ebpf.md section 3). Our BPF code takes no struct layout from
# these headers (offsets come from BTF), so a different kernel version is fine.
#
# The tree is cached outside the repository, keyed by the header package
# version, built with hard links (no extra space) and published atomically:
#   $FPHINT_CACHE/kernel-headers/<abi>_<version>/   and a `current` symlink.
# guest_agent.sources.ebpf.headers points BCC_KERNEL_SOURCE at `current`.
# Safe to run again and concurrently. Prints the directory bcc will use.
set -eu

CACHE=${FPHINT_CACHE:-/var/cache/fphint}
rel=$(uname -r)

for d in "/lib/modules/$rel/build" "/lib/modules/$rel/source"; do
    if [ -f "$d/include/linux/kconfig.h" ]; then
        echo "native kernel headers: /lib/modules/$rel/build"
        exit 0
    fi
done

arch=$(dpkg --print-architecture)
meta="linux-headers-$arch"
deps() { dpkg-query -W -f='${Depends}' "$1" 2>/dev/null | tr ',' '\n' | sed 's/^ *//; s/ .*//'; }

flavour=$(deps "$meta" | grep '^linux-headers-' | head -n1 || true)
if [ -z "$flavour" ]; then
    echo "bcc-headers: $meta is not installed (apt-get install $meta)" >&2
    exit 1
fi
common=$(deps "$flavour" | grep '^linux-headers-.*-common' | head -n1 || true)
version=$(dpkg-query -W -f='${Version}' "$flavour")
src_flavour="/usr/src/$flavour"
src_common="/usr/src/$common"
for d in "$src_flavour" "$src_common"; do
    if [ ! -d "$d" ]; then
        echo "bcc-headers: $d is missing (reinstall $flavour)" >&2
        exit 1
    fi
done

root="$CACHE/kernel-headers"
key="${flavour#linux-headers-}_$version"
dest="$root/$key"
mkdir -p "$root"

if [ ! -f "$dest/.complete" ]; then
    tmp=$(mktemp -d "$root/.build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # Hard links when /usr/src and the cache share a filesystem, else a copy.
    cp -al "$src_common/." "$tmp/" 2>/dev/null || cp -a "$src_common/." "$tmp/"
    cp -al --remove-destination "$src_flavour/." "$tmp/" 2>/dev/null ||
        cp -a --remove-destination "$src_flavour/." "$tmp/"
    # Top-level relative links (scripts, tools -> ../../lib/linux-kbuild-*)
    # break once moved; point them at their real targets.
    for link in "$tmp"/*; do
        if [ -L "$link" ]; then
            name=$(basename "$link")
            target=$(readlink -f "$src_flavour/$name" || readlink -f "$src_common/$name" || true)
            rm -f "$link"
            if [ -n "$target" ] && [ -e "$target" ]; then ln -s "$target" "$link"; fi
        fi
    done
    if [ ! -f "$tmp/include/linux/kconfig.h" ]; then
        echo "bcc-headers: merged tree has no include/linux/kconfig.h" >&2
        exit 1
    fi
    echo "$flavour $version" > "$tmp/.complete"
    # Another run may have published the same key meanwhile: keep theirs.
    if mv -T "$tmp" "$dest" 2>/dev/null; then trap - EXIT; fi
fi

ln -sfn "$key" "$root/.current.$$"
mv -T "$root/.current.$$" "$root/current"
echo "$root/current"
