#!/usr/bin/env bash
# Debian packages pdserve needs at run time. Idempotent; a no-op when present.
#   libibverbs1: loaded by the Mooncake Transfer Engine even for its TCP transport.
set -euo pipefail
needed=()
for pkg in libibverbs1 curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || needed+=("$pkg")
done
[ ${#needed[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "pdserve needs Debian packages: ${needed[*]} (run as root or install them)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${needed[@]}"
