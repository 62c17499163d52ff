#!/bin/bash
# Broker RSS per idle terminal, measured twice on one data directory (docs/benchmarks.md,
# "Memory per idle terminal"):
#   1. enrol + connect: a fresh broker, 10,000 simulated terminals get certificates and connect;
#   2. reconnect: the broker restarted gracefully (registry loaded), all 10,000 reconnect at once.
# Each figure is (RSS after 20 s idle - RSS before the terminals) / 10,000.
#
# usage: tests/tools/rss-per-terminal.sh LABEL [VAR=VALUE ...]
#   VAR=VALUE pairs are put in the broker's environment, e.g.
#   LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2 to try another allocator.
# Binaries from $BIN_DIR (default target/release: cargo build --release -p posfleet-tests --bins).
# Loopback only (127.0.0.1, ports 28883/28443/28884); two simulator processes of 5,000.
set -u
BIN_DIR=$(realpath "${BIN_DIR:-target/release}")
LABEL=$1; shift
D=$(mktemp -d "/tmp/posfleet-rss-$LABEL.XXXXXX"); cd "$D"
ulimit -n 20000
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
start_broker() {
  env "$@" RUST_LOG=warn "$BIN_DIR/pf-broker" serve --data-dir "$D/data" \
    --mqtt-listen 127.0.0.1:28883 --api-listen 127.0.0.1:28443 --device-listen 127.0.0.1:28884 \
    --two-person-approval off --mqtt-max-per-address 19999 --mqtt-max-pending-per-address 19999 \
    >> broker.log 2>&1 &
  echo $! > broker.pid
  while [ ! -f data/posctl.json ]; do sleep 0.1; done
}
# Waits until both simulators report 5,000 connected in a report newer than $1 (ms).
wait_all() {
  for _ in $(seq 1 300); do
    ok=0
    for p in 0 1; do
      l=$(tail -n 1 "sim$p.out" 2>/dev/null)
      c=$(sed -n 's/.*connected=\([0-9]*\).*/\1/p' <<< "$l")
      at=$(sed -n 's/.*at_ms=\([0-9]*\).*/\1/p' <<< "$l")
      [ "$c" = 5000 ] && [ "${at:-0}" -gt "$1" ] && ok=$((ok + 1))
    done
    [ $ok = 2 ] && return 0
    sleep 1
  done
  return 1
}
start_broker "$@"; sleep 2
b=$(cat broker.pid); r0=$(rss "$b"); t=$(date +%s%3N)
for p in 0 1; do
  RUST_LOG=warn "$BIN_DIR/pf-agent" simulate --count 5000 --pki-dir data/pki \
    --broker mqtts://127.0.0.1:28883 --id-prefix "m$p-" --heartbeat-interval 10s \
    --telemetry-interval 60s --tx-rate 0 --data-dir "sim$p" --report-every 1s \
    > "sim$p.out" 2> "sim$p.err" &
done
wait_all "$t" || echo "not all connected"
sleep 20; r1=$(rss "$b")
echo "$LABEL enrol+connect: before $r0 KiB, idle $r1 KiB, $(( (r1 - r0) * 1024 / 10000 )) B per terminal"
kill -TERM "$b"; while kill -0 "$b" 2>/dev/null; do sleep 0.1; done
rm -f data/posctl.json; t=$(date +%s%3N)
start_broker "$@"
b=$(cat broker.pid); r2=$(rss "$b")
wait_all "$t" || echo "not all back"
sleep 20; r3=$(rss "$b")
echo "$LABEL reconnect: before $r2 KiB, idle $r3 KiB, $(( (r3 - r2) * 1024 / 10000 )) B per connection"
pkill -f -- "--id-prefix m[01]-"; kill -TERM "$b"; sleep 2
rm -rf "$D"
