# What the profiling scripts in benches/ (callgrind-drain, latency-trace, nats-profile,
# sched-idle) share: sourced after they cd to the checkout.

script="$(basename "$0")"

# needs TOOL PACKAGE: stops, naming the Debian package, when TOOL is not installed.
needs() {
  command -v "$1" >/dev/null || { echo "$script: needs $1: apt-get install $2" >&2; exit 2; }
}

# walstream_binary [PATH]: sets `binary` to the walstream build to profile (default: this
# checkout's, built as `cargo bench` builds it, with the shipped build's settings, into the
# release directory), and stops when there is none.
walstream_binary() {
  if [ -z "${1:-}" ]; then
    cargo bench --locked --quiet --bench pipeline --no-run >&2
  fi
  binary="$(realpath -m "${1:-${CARGO_TARGET_DIR:-target}/release/walstream}")"
  [ -x "$binary" ] || { echo "$script: no walstream at $binary (cargo bench --no-run, or name one)" >&2; exit 2; }
}

# work_dir [KEEP]: sets `work` to the directory for the run's files: KEEP when given (created,
# and kept), else a temporary directory removed at exit.
work_dir() {
  if [ -n "${1:-}" ]; then
    work="$1"
    mkdir -p "$work"
  else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
  fi
}
