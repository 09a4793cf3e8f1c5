#!/usr/bin/env bash
# ftvm quick start on a fresh Debian 12 machine, as root:
#   ./setup.sh demo            install everything, then run the Level 1 lab demo
#   ./setup.sh test [ARGS]     install everything, then run the test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio etcd-server iproute2 gcc libc6-dev nbdkit nbdkit-plugin-dev
          python3 python3-venv chromium syslinux syslinux-common mtools dosfstools)

install_system() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # The demo guest's kernel comes from apt: the package lists must know it.
    if [ ${#missing[@]} -gt 0 ] || ! apt-cache depends linux-image-cloud-amd64 >/dev/null 2>&1 \
            || [ -z "$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep Depends)" ]; then
        apt-get update -q
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        # Keep the etcd-server package from starting a system-wide etcd: the lab runs its own.
        local policy=/usr/sbin/policy-rc.d made_policy=0
        if [ ! -e $policy ]; then
            printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy && made_policy=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
            || { if [ $made_policy = 1 ]; then rm -f $policy; fi; exit 1; }
        if [ $made_policy = 1 ]; then rm -f $policy; fi
    fi
}

# QEMU and its storage daemons run as this unprivileged user, never as root (src/ftvm/qemu/runas.py);
# in group kvm where there is one, for /dev/kvm.
ensure_qemu_user() {
    id ftvm-qemu >/dev/null 2>&1 && return
    local groups=()
    if getent group kvm >/dev/null; then groups=(--groups kvm); fi
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "${groups[@]}" ftvm-qemu
}

install_python() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (the lab uses network namespaces and taps)" >&2
    exit 2
fi

case "${1:-}" in
    demo)
        install_system
        ensure_qemu_user
        install_python
        shift
        exec .venv/bin/ftvm demo --level 1 "$@"
        ;;
    test)
        install_system
        ensure_qemu_user
        install_python
        shift
        .venv/bin/ruff check src tests
        .venv/bin/mypy src
        # pytest imports test modules by their file name: two of one name stop the collection
        dups=$(find tests -name 'test_*.py' -printf '%f\n' | sort | uniq -d)
        if [ -n "$dups" ]; then
            echo "setup.sh: test modules with the same file name in two directories: $dups" >&2
            exit 1
        fi
        set +e
        .venv/bin/pytest -p no:cacheprovider "$@"
        rc=$?
        set -e
        if [ $rc -eq 5 ]; then
            echo "setup.sh: pytest collected no tests: that is a failure" >&2
            exit 1
        fi
        exit $rc
        ;;
    *)
        echo "usage: ./setup.sh demo | test [pytest args]" >&2
        exit 2
        ;;
esac
