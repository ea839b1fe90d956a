#!/bin/sh
# QEMU 10.0 from bookworm-backports, unpacked beside Debian's QEMU 7.2.
#
# Why: QEMU before 9.0 under TCG loses guest writes during migration (the
# dirty-bitmap sync does not reset the TCG TLB; upstream "physmem: Fix migration
# dirty bitmap coherency with TCG memory access"), so migrating a *running*
# guest without KVM needs QEMU >= 9.0. The two packages conflict, so the
# backport is fetched with a private apt configuration (the system's sources
# are not touched) and unpacked with dpkg -x. A wrapper script adds its
# firmware and module directories.
#
# Output: $FPH_QEMU10_DIR/bin/qemu-system-x86_64 (default /var/cache/fphint/qemu-10.0).
# Safe to run again: does nothing when the wrapper already runs.
set -eu
DEST=${FPH_QEMU10_DIR:-/var/cache/fphint/qemu-10.0}
WRAPPER="$DEST/bin/qemu-system-x86_64"
if [ -x "$WRAPPER" ] && "$WRAPPER" --version 2>/dev/null | grep -q "version 10\."; then
    exit 0
fi
echo "== fetching QEMU 10.0 from bookworm-backports into $DEST"
APTDIR="$DEST.apt"
rm -rf "$DEST" "$APTDIR"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/archives/partial" "$APTDIR/debs" "$DEST/root" "$DEST/bin"
echo "deb http://deb.debian.org/debian bookworm-backports main" > "$APTDIR/sources.list"
set -- -o "Dir::Etc::sourcelist=$APTDIR/sources.list" -o "Dir::Etc::sourceparts=-" \
       -o "Dir::State::lists=$APTDIR/lists" -o "Dir::Cache::archives=$APTDIR/archives" \
       -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1"
apt-get "$@" update -q >/dev/null
PKGS="qemu-system-x86 qemu-system-common qemu-system-data seabios"
(cd "$APTDIR/debs" && apt-get "$@" download $PKGS >/dev/null)
for deb in "$APTDIR"/debs/*.deb; do
    dpkg -x "$deb" "$DEST/root"
done
# Shared libraries come from bookworm itself (the backport is built against it);
# install the ones the 7.2 package did not already bring.
deps=$(apt-cache "$@" depends qemu-system-x86 qemu-system-common | awk '/Depends:/ {print $2}' \
       | grep -v -E '^(qemu-|seabios|ipxe-qemu|<)' | sort -u)
missing=""
for p in $deps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "== installing libraries QEMU 10.0 needs:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
R="$DEST/root"
cat > "$WRAPPER" <<WRAP
#!/bin/sh
# QEMU 10.0 unpacked by scripts/install-qemu10.sh: its own firmware and modules.
export QEMU_MODULE_DIR="$R/usr/lib/x86_64-linux-gnu/qemu"
exec "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" "\$@"
WRAP
chmod +x "$WRAPPER"
if ldd "$R/usr/bin/qemu-system-x86_64" | grep -q "not found"; then
    ldd "$R/usr/bin/qemu-system-x86_64" | grep "not found" >&2
    echo "install-qemu10: shared libraries missing" >&2
    exit 1
fi
"$WRAPPER" --version | head -1
