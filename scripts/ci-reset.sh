#!/bin/sh
# Undo what an earlier run of the suite (or of the demo) may have left on this
# machine, so that CI on a used machine starts as it would on a fresh Debian 12
# one: nothing mounted that a fresh machine lacks, no stale guests or their RAM
# files, no temporary directories of ours.
#
# Kept on purpose: installed Debian packages and /var/cache/fphint (the guest
# image, QEMU 10, the kernel-header tree). Every entry there is keyed by what
# built it and is rebuilt when that changes; `make test` creates each of them
# when missing, so a fresh machine only takes longer.
set -u

say() { echo "ci-reset: $*"; }

# Guests, daemons and agents of an earlier run (a session's processes end when
# it stops, but a run killed half-way can leave some behind).
for pattern in "qemu-system-x86_64.*fphvm-" "host_collector serve" "guest_agent .*run" "fph-collector serve"; do
    if pkill -9 -f "$pattern" 2>/dev/null; then say "killed leftover processes matching '$pattern'"; fi
done

# Pseudo filesystems the suite or the agent mounted (a fresh machine has neither
# tracefs nor debugfs mounted). Innermost first.
for target in /sys/kernel/debug/tracing /sys/kernel/tracing /sys/kernel/debug; do
    while grep -q " $target " /proc/self/mounts 2>/dev/null; do
        if umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null; then
            say "unmounted $target"
        else
            say "cannot unmount $target"; break
        fi
    done
done

# Guest RAM files and run directories of earlier runs.
rm -f /dev/shm/fphvm-*.ram /dev/shm/fphint-*.ram 2>/dev/null
for d in /tmp/fphvm-* /tmp/fphint-* /tmp/pytest-of-root; do
    if [ -e "$d" ]; then rm -rf "$d"; say "removed $d"; fi
done
exit 0
