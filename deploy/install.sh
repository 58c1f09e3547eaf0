#!/usr/bin/env bash
# Installs a DIV release (scripts/release.sh) on a Debian/Ubuntu VM: what deploy/cloud-init.yaml
# runs at first boot, and what an operator runs by hand to upgrade.
#
#   deploy/install.sh div-<version>-linux-<arch>.tar.gz [host|custodian|both]
#
# Puts the release in /opt/div (the previous one kept as /opt/div.old), the config files in
# /etc/div (an operator's edited copy is never overwritten), the systemd units in
# /etc/systemd/system, and enables them. A service starts once its key is in place
# (/etc/div/host-key or /etc/div/custodian-key, mode 0600): keys never travel in user-data.
# DIV_ROOT installs under another root (tests); systemctl runs only on the running system.
set -euo pipefail
tarball=${1:?usage: install.sh RELEASE.tar.gz [host|custodian|both]}
role=${2:-host}
root=${DIV_ROOT:-/}
case "$role" in
  host) units=(div-host.service) ;;
  custodian) units=(div-custodian.service) ;;
  both) units=(div-host.service div-custodian.service) ;;
  *) echo "install.sh: role must be host, custodian or both" >&2; exit 2 ;;
esac

new="$root/opt/div.new"
rm -rf "$new"
mkdir -p "$new"
tar -C "$new" --strip-components=1 --no-same-owner -xzf "$tarball"
"$new/bin/div" --version >/dev/null || { echo "install.sh: the release's div does not run here" >&2; exit 1; }
rm -rf "$root/opt/div.old"
if [ -d "$root/opt/div" ]; then mv "$root/opt/div" "$root/opt/div.old"; fi
mv "$new" "$root/opt/div"

install -d -m 0755 "$root/etc/div" "$root/etc/systemd/system"
for f in div.toml custodian.toml; do
  [ -f "$root/etc/div/$f" ] || install -m 0644 "$root/opt/div/deploy/$f" "$root/etc/div/$f"
done
for u in "${units[@]}"; do
  install -m 0644 "$root/opt/div/deploy/systemd/$u" "$root/etc/systemd/system/$u"
done

if [ "$root" = / ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable "${units[@]}"
  for u in "${units[@]}"; do
    key=/etc/div/host-key
    [ "$u" = div-custodian.service ] && key=/etc/div/custodian-key
    if [ -f "$key" ]; then systemctl restart "$u"; else echo "install.sh: $u starts once $key (0600) is in place"; fi
  done
else
  echo "install.sh: installed under $root (units not started: not the running system)"
fi
