#!/bin/sh
# sessionlb custom balancer example: pin some users to a node.
#
# A user listed below gets their pinned node when it is among the
# candidates; everyone else (and a pinned user whose node is stopped,
# draining or unreachable) gets the first candidate. Needs only POSIX sh.
#
# Edit the map: one `user) pinned=host:port ;;` line per user, with the
# node's address exactly as it appears in RSTUDIO_NODES.
#
# Install: copy to /usr/lib/rstudio-server/bin/rserver-balancer (mode 755),
# or point `custom-balancer-command` at it, and set `balancer = custom`.
# Protocol: plugins/README.md. This plug-in needs only the environment and
# does not read the JSON on stdin (sessionlb copes with that).
set -u

nodes=${RSTUDIO_NODES:-}
user=${RSTUDIO_USERNAME:-}
if [ -z "$nodes" ]; then
  echo "pin-users: RSTUDIO_NODES is empty" >&2
  exit 1
fi

pinned=
case "$user" in
  alice) pinned=10.0.0.13:8787 ;;
  bob) pinned=10.0.0.12:8787 ;;
esac

if [ -n "$pinned" ]; then
  case ",$nodes," in
    *",$pinned,"*)
      printf '%s\n' "$pinned"
      exit 0
      ;;
  esac
fi
printf '%s\n' "${nodes%%,*}"
