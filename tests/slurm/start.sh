#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munged, slurmctld, slurmd) from Debian's
# slurm-wlm and munge, for tests/test_slurm.py. Idempotent: a cluster that already answers is kept.
# Needs root (the daemons run as root here). Installs the packages when they are missing.
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
node_up() { pgrep -x slurmd >/dev/null && timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }
if node_up; then
  exit 0
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
NODE="$(hostname -s)"
CPUS="$(nproc)"
MEMORY_MB="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
sed -e "s/@NODE@/$NODE/g" -e "s/@CPUS@/$CPUS/g" -e "s/@MEMORY_MB@/$MEMORY_MB/g" "$HERE/slurm.conf" > /etc/slurm/slurm.conf
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n </dev/null >/dev/null 2>&1; then  # munged answers on its socket, or is started
  su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  for _ in $(seq 1 20); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.5; done
fi
timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
deadline=$(( $(date +%s) + 90 ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if node_up; then
    exit 0
  fi
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd  # (again: one that was shutting down has gone)
  timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
exit 1
