#!/bin/sh
# Installs the real servers some integration tests start and pip cannot provide:
# HAProxy (rolling deploys behind a load balancer), PostgreSQL (the durable-task
# journal), curl (the README's commands). Debian packages; only what is missing.
#
# Without root (or sudo) or apt-get it installs nothing and says so: those tests
# then skip and say why, or, with CI=true, fail (a CI run must not pass by
# skipping its servers).
set -eu

missing=""
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing="$missing postgresql"
fi
if [ -z "$missing" ]; then
  echo "system servers: haproxy, postgresql and curl are installed"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root="sudo -n"
else
  echo "system servers: missing:$missing (no root: tests that need them skip)" >&2
  [ "${CI:-}" = true ] && exit 1
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system servers: missing:$missing (no apt-get: tests that need them skip)" >&2
  [ "${CI:-}" = true ] && exit 1
  exit 0
fi

echo "system servers: installing$missing"
$as_root apt-get update -qq
# shellcheck disable=SC2086  # $missing is a list of package names
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "system servers: installed$missing"
