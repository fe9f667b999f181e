#!/usr/bin/env bash
# Print the path of a Consul binary, providing one when none is given.
#
# Order: $CERANA_CONSUL_BIN, then `consul` on PATH, then a project-local copy
# unpacked from Debian's `consul` package. Bookworm has no such package, so the
# .deb is fetched from the bullseye suite with a private apt source list whose
# mirror URI is read from this system's own apt configuration; the system's apt
# state is never touched. The result lives in .tools/ (git-ignored).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="${CERANA_TOOLS_DIR:-$here/.tools}"
local_bin="$tools/consul/usr/bin/consul"

if [ -n "${CERANA_CONSUL_BIN:-}" ]; then
  if [ ! -x "$CERANA_CONSUL_BIN" ]; then
    echo "ensure-consul: CERANA_CONSUL_BIN=$CERANA_CONSUL_BIN is not an executable file" >&2
    exit 1
  fi
  echo "$CERANA_CONSUL_BIN"; exit 0
fi
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi
if [ -x "$local_bin" ]; then echo "$local_bin"; exit 0; fi

# The first Debian mirror URI configured on this system (the security suite excluded).
mirror_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/{print $2; exit}' "$f")
    case "$uri" in *security*|"") continue ;; esac
    echo "$uri"; return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  return 1
}

uri=$(mirror_uri) || { echo "ensure-consul: no Debian mirror found in the apt configuration" >&2; exit 1; }
work="$tools/apt-bullseye"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$tools"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bullseye main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -q)
apt-get "${opts[@]}" update >&2
( cd "$work" && rm -f consul_*.deb && apt-get "${opts[@]}" download consul >&2 )
deb=$(ls "$work"/consul_*.deb | head -n1)
rm -rf "$tools/consul.tmp" && mkdir -p "$tools/consul.tmp"
dpkg -x "$deb" "$tools/consul.tmp"
rm -rf "$tools/consul" && mv "$tools/consul.tmp" "$tools/consul"
"$local_bin" version >&2
echo "$local_bin"
