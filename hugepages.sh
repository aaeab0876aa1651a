#!/usr/bin/env bash
# Reserves 2 MiB hugepages and mounts hugetlbfs for nvmirror's NVRAM ring and malloc devices
# (and SPDK's tools). See --help. Exit codes: 0 done, 1 error, 2 usage, 3 kernel granted fewer pages.
set -euo pipefail

readonly COUNT_DEFAULT=1024
readonly MOUNT_POINT=/dev/hugepages
readonly PROC_NR=/proc/sys/vm/nr_hugepages
readonly SYSFS_2M=/sys/kernel/mm/hugepages/hugepages-2048kB
# Written when this script mounts hugetlbfs, so --release unmounts only what it mounted.
readonly MOUNTED_MARKER=/run/nvmirror-hugepages.mounted

usage() {
    cat <<EOF
usage: $(basename "$0") [COUNT]      reserve COUNT 2 MiB hugepages (default $COUNT_DEFAULT = 2 GiB) and
                                  mount hugetlbfs at $MOUNT_POINT if no hugetlbfs is mounted;
                                  never lowers a larger existing reservation
       $(basename "$0") --status     print total/free/reserved/surplus pages and hugetlbfs mounts
       $(basename "$0") --release    set the 2 MiB reservation to 0; unmount $MOUNT_POINT if this
                                  script mounted it and nothing uses it
       $(basename "$0") --help
exit: 0 done, 1 error (not root, no hugepage support), 2 usage, 3 kernel granted fewer pages than asked
EOF
}

die() {
    echo "hugepages: error: $*" >&2
    exit 1
}

# Pages of 2 MiB: the per-size sysfs directory when present, else the default-size knobs.
page_file() {
    if [[ -d $SYSFS_2M ]]; then
        cat "$SYSFS_2M/$1"
    else
        case $1 in
            nr_hugepages) cat "$PROC_NR" ;;
            free_hugepages) awk '/^HugePages_Free:/ {print $2}' /proc/meminfo ;;
            resv_hugepages) awk '/^HugePages_Rsvd:/ {print $2}' /proc/meminfo ;;
            surplus_hugepages) awk '/^HugePages_Surp:/ {print $2}' /proc/meminfo ;;
        esac
    fi
}

set_nr() {
    if [[ -d $SYSFS_2M ]]; then
        echo "$1" >"$SYSFS_2M/nr_hugepages"
    else
        echo "$1" >"$PROC_NR"
    fi
}

require_support() {
    [[ -e $PROC_NR ]] || die "$PROC_NR does not exist: this kernel has no hugetlb support"
    if [[ ! -d $SYSFS_2M ]]; then
        local size_kb
        size_kb=$(awk '/^Hugepagesize:/ {print $2}' /proc/meminfo)
        [[ $size_kb == 2048 ]] || die "no 2 MiB hugepage size (default size is ${size_kb} kB)"
    fi
}

require_root() {
    [[ $EUID -eq 0 ]] || die "must run as root to change the hugepage reservation (try: sudo $0 $*)"
}

hugetlbfs_mounts() {
    awk '$3 == "hugetlbfs" {print $2}' /proc/mounts
}

status() {
    echo "hugepages (2 MiB): total $(page_file nr_hugepages), free $(page_file free_hugepages)," \
        "reserved $(page_file resv_hugepages), surplus $(page_file surplus_hugepages)"
    local mounts
    mounts=$(hugetlbfs_mounts)
    if [[ -n $mounts ]]; then
        echo "hugetlbfs mounted at: $(echo "$mounts" | tr '\n' ' ')"
    else
        echo "hugetlbfs: not mounted"
    fi
}

ensure_mounted() {
    local mounts
    mounts=$(hugetlbfs_mounts)
    if [[ -n $mounts ]]; then
        echo "hugetlbfs already mounted at $(echo "$mounts" | tr '\n' ' ')"
        return
    fi
    mkdir -p "$MOUNT_POINT"
    mount -t hugetlbfs -o pagesize=2M nodev "$MOUNT_POINT" || die "mount -t hugetlbfs $MOUNT_POINT failed"
    touch "$MOUNTED_MARKER"
    echo "hugetlbfs mounted at $MOUNT_POINT"
}

reserve() {
    local count=$1 before after
    before=$(page_file nr_hugepages)
    if ((before >= count)); then
        echo "hugepages: $before reserved (>= $count asked; left unchanged), $(page_file free_hugepages) free"
    else
        set_nr "$count" || die "writing $count to nr_hugepages failed"
        after=$(page_file nr_hugepages)
        echo "hugepages: $before -> $after reserved ($(page_file free_hugepages) free)"
    fi
    ensure_mounted
    after=$(page_file nr_hugepages)
    if ((after < count)); then
        echo "hugepages: error: asked for $count pages, the kernel granted $after" \
            "(memory fragmented or too small); nvmirror still runs, with regular memory" >&2
        exit 3
    fi
}

release() {
    local before after
    before=$(page_file nr_hugepages)
    set_nr 0 || die "writing 0 to nr_hugepages failed"
    after=$(page_file nr_hugepages)
    echo "hugepages: $before -> $after reserved"
    if ((after > 0)); then
        echo "hugepages: $after pages still in use (files in hugetlbfs or running processes);" \
            "the kernel frees them when they are released"
    fi
    if [[ ! -e $MOUNTED_MARKER ]]; then
        echo "hugetlbfs: left as is (not mounted by this script)"
    elif [[ -n $(ls -A "$MOUNT_POINT" 2>/dev/null) ]]; then
        echo "hugetlbfs: left mounted at $MOUNT_POINT (it holds files: $(ls -A "$MOUNT_POINT" | tr '\n' ' '))"
    elif umount "$MOUNT_POINT" 2>/dev/null; then
        rm -f "$MOUNTED_MARKER"
        echo "hugetlbfs: unmounted $MOUNT_POINT"
    else
        echo "hugetlbfs: left mounted at $MOUNT_POINT (busy)"
    fi
}

main() {
    local arg=${1:-$COUNT_DEFAULT}
    if (($# > 1)); then
        usage >&2
        exit 2
    fi
    case $arg in
        -h | --help)
            usage
            ;;
        --status)
            require_support
            status
            ;;
        --release)
            require_support
            require_root "$@"
            release
            ;;
        *)
            if [[ ! $arg =~ ^[0-9]+$ ]] || ((10#$arg == 0)); then
                echo "hugepages: error: COUNT must be a positive integer, got '$arg'" >&2
                usage >&2
                exit 2
            fi
            require_support
            require_root "$@"
            reserve "$((10#$arg))"
            ;;
    esac
}

main "$@"
