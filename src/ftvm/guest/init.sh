#!/bin/busybox sh
# ftvm demo guest init: load virtio drivers, configure the NIC from the kernel
# command line (ftvm.ip=ADDR/PREFIX), then run the ledger service forever on the
# device ftvm.ledger=DEV names (default /dev/vda), with its HTTP health endpoint on
# port 8080. A shell waits on the serial console (`ftvm vm console`; no login: a demo).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Order follows each module's depends= (the package ships no modules.dep).
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         failover net_failover virtio_net virtio_blk evdev button pvpanic pvpanic-mmio; do
    insmod /lib/modules/$m.ko || echo "ftvm-init: insmod $m failed"
done
# The ACPI power button (`ftvm vm stop`): busybox acpid runs /etc/acpi/PWRF/00000080;
# -f because PID 1 is this script, not an init that poweroff could signal.
mkdir -p /etc/acpi/PWRF /var/log
printf '#!/bin/sh\necho "ftvm-init: power button, powering off" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null || echo "ftvm-init: acpid failed"
IP=""
LEDGER=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ftvm.ip=*) IP="${arg#ftvm.ip=}" ;;
        ftvm.ledger=*) LEDGER="${arg#ftvm.ledger=}" ;;
    esac
done
( while true; do setsid cttyhack sh; sleep 1; done ) </dev/ttyS0 >/dev/ttyS0 2>&1 &
ip link set lo up
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 0.2; done
ip link set eth0 up
[ -n "$IP" ] && ip addr add "$IP" dev eth0
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b "$LEDGER" ] && break; sleep 0.2; done
echo "ftvm-init: network ${IP:-none}, starting ledger on $LEDGER"
while true; do
    /bin/ledger "$LEDGER" 7000 8080
    echo "ftvm-init: ledger exited ($?), restarting"
    sleep 1
done
