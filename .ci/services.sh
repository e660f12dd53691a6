#!/usr/bin/env bash
# Makes sure NATS (with JetStream), PostgreSQL, Redis and an S3 stand-in (moto) answer on
# loopback: uses them when they run, starts them when installed but stopped, installs them when
# missing (as root: Debian packages, and moto from PyPI). Idempotent; prints one line per service.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do listening "$1" && return 0; sleep 0.5; done
  echo "services: $2 did not start on port $1" >&2
  return 1
}

apt_updated=""
install() {
  if [ "$(id -u)" != 0 ]; then
    echo "services: $* missing and not root: install them (apt-get install $*)" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# NATS with JetStream.
if listening 4222; then
  echo "services: nats on 4222 (running)"
else
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || install nats-server
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server || echo /usr/sbin/nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222 nats-server
  echo "services: nats on 4222 (started)"
fi

# PostgreSQL, reachable as postgres@127.0.0.1 without a password.
if listening 5432; then
  echo "services: postgresql on 5432 (running)"
else
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    install postgresql
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
    # A test machine: trust loopback so the default DATABASE_URL works.
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  wait_port 5432 postgresql
  echo "services: postgresql on 5432 (started)"
fi

# Redis, without persistence: it only holds projections.
if listening 6379; then
  echo "services: redis on 6379 (running)"
else
  command -v redis-server >/dev/null || install redis-server
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 redis-server
  echo "services: redis on 6379 (started)"
fi

# S3 for the archive port's tests: moto's server, an in-memory stand-in (no persistence).
if listening 5000; then
  echo "services: s3 (moto) on 5000 (running)"
else
  moto=$(command -v moto_server || true)
  if [ -z "$moto" ]; then
    # Its own virtualenv: works whatever the system Python allows pip to do (PEP 668).
    moto=/opt/moto-server/bin/moto_server
    if [ ! -x "$moto" ]; then
      python3 -c 'import venv, ensurepip' 2>/dev/null || install python3 python3-venv
      python3 -m venv /opt/moto-server
      /opt/moto-server/bin/python -m pip install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
    fi
  fi
  setsid "$moto" -H 127.0.0.1 -p 5000 >/tmp/moto-server.log 2>&1 </dev/null &
  wait_port 5000 "moto_server (log: /tmp/moto-server.log)"
  echo "services: s3 (moto) on 5000 (started)"
fi

# An SMTP sink for oversight's e-mail tests: aiosmtpd, which those tests start themselves on a
# spare port (nothing to run here, only to install). Its own virtualenv, like moto's.
if python3 -c 'import aiosmtpd' 2>/dev/null || /opt/aiosmtpd/bin/python -c 'import aiosmtpd' 2>/dev/null; then
  echo "services: aiosmtpd (installed)"
else
  python3 -c 'import venv, ensurepip' 2>/dev/null || install python3 python3-venv
  python3 -m venv /opt/aiosmtpd
  /opt/aiosmtpd/bin/python -m pip install --quiet --disable-pip-version-check 'aiosmtpd>=1.4,<2'
  echo "services: aiosmtpd (installed in /opt/aiosmtpd)"
fi

# The runtime's Linux sandboxes (gateways/tests/runtime_containment.rs): bubblewrap, and the
# firewall tools for each sandbox's network namespace (nft preferred: one process per sandbox;
# iptables-restore as the fallback), iproute2 to inspect the namespaces, and mkfs.ext4 and mount
# for each sandbox's disk (a loop-mounted image).
if command -v bwrap >/dev/null && command -v nft >/dev/null && command -v iptables >/dev/null \
  && command -v ip >/dev/null && command -v mkfs.ext4 >/dev/null && command -v mount >/dev/null; then
  echo "services: bubblewrap, nftables, iptables, e2fsprogs (installed)"
else
  install bubblewrap nftables iptables iproute2 e2fsprogs mount
  echo "services: bubblewrap, nftables, iptables, e2fsprogs (installed now)"
fi

# Headless Chromium and its WebDriver for the approval page's browser test, which starts
# chromedriver itself on a spare port (nothing to run here, only to install).
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "services: chromium and chromedriver (installed)"
else
  install chromium chromium-driver
  echo "services: chromium and chromedriver (installed now)"
fi
