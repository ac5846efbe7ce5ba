# Sourced by scripts/test.sh and scripts/quickstart.sh: install what a fresh
# Debian machine with Rust lacks for building sessionlb (cmake: Pingora's
# zlib-ng is built with it), and, with `tests`, for running its tests.

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

# install_prerequisites [tests]
install_prerequisites() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v cc >/dev/null || missing+=(build-essential)
  if [ "${1:-}" = tests ]; then
    command -v curl >/dev/null || missing+=(curl)
    command -v ip >/dev/null || missing+=(iproute2)
    # The status page test loads the page in Debian's headless Chromium.
    [ -x /usr/bin/chromium ] || missing+=(chromium)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
